"""The DALAResNet50 model (``dalaresnet.py``), its attention registry (``attention.py``) and
the comparison baselines (``baselines.py``); ``ensemble.py`` holds a ``--cv`` trial's fold
models as one. Import the submodules: config validation
imports ``attention`` alone, without torchvision."""
