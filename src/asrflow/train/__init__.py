"""Training components: features, models, losses, augmentation and mixed precision.

Each submodule is plain torch (no Horovod, no MLflow), so it can be imported and tested anywhere;
import what you need from the submodules directly (``from asrflow.train.losses import build_ctc_loss``).
"""
