"""tinycnn: a staged CNN for Tiny ImageNet as timm models, WebDataset shards, GPU-side augmentation.

`import tinycnn` registers the models with timm (`timm.create_model('tinycnn')`).
"""
__version__ = "0.2.0"

from .augment import GPUAugment, eval_transform  # noqa: F401
from .data import build_loader  # noqa: F401
from .hub import export_hub, push_hub  # noqa: F401
from .model import TinyCNN  # noqa: F401  (registers the timm models)
from .transfer import DevicePrefetcher  # noqa: F401
from .weights import load_model, read_metadata, save_model  # noqa: F401
