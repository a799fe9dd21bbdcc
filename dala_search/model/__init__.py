"""The DALAResNet50 model (``dalaresnet.py``), its attention registry (``attention.py``) and
the comparison baselines (``baselines.py``). Import the submodules: config validation
imports ``attention`` alone, without torchvision."""
