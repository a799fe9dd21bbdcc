"""The DALAResNet50 model (``dalaresnet.py``), its attention registry (``attention.py``), the
comparison baselines (``baselines.py``) and the ``--cv`` fold ensemble (``ensemble.py``).
Import the submodules: config validation imports ``attention`` alone, without torchvision."""
