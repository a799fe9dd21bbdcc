"""The record of a search: plan, MLflow schema and the evaluation/baseline documents (Ray-free)."""
