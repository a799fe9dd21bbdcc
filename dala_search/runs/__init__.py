"""The record of a search, without Ray: its plan and folder (``plan``), the names and
readers of what it leaves in MLflow (``schema``) and the evaluation/baseline documents
(``documents``). Evaluation, report and CLI read searches through this layer;
``dala_search.search`` writes them."""
