"""tokserve model library: tokenizers, generators, samplers, named configurations, checkpoint I/O.

Pure PyTorch (+ timm, safetensors): nothing here imports the server, training or export packages.

    >>> import models
    >>> tok = models.create_model("softvq-tiny-64")          # random weights, by name
    >>> tok = models.load_pretrained("weights/default/tokenizer")   # config.json + safetensors
"""

from models.hub import CheckpointError, load_pretrained, read_state_dict, save_pretrained
from models.registry import create_model, get_config, list_models

# Importing a family registers its classes and named configurations.
from models import softvq as softvq  # noqa: E402,F401  (tokenizers)
from models import sit as sit  # noqa: E402,F401  (SiT / DiT generators)
from models import mar as mar  # noqa: E402,F401  (MAR generator with its diffusion head)
from models import kl16 as kl16  # noqa: E402,F401  (the KL-16 VAE of the published MAR)
from models import taef2 as taef2  # noqa: E402,F401  (the pretrained TAEF2 autoencoder)
from models import softvq_taef2 as softvq_taef2  # noqa: E402,F401  (SoftVQ on the frozen TAEF2 latent grid)
from models import coda as coda  # noqa: E402,F401  (CODA: discrete tokens on a frozen continuous VAE)
from models import maskgit as maskgit  # noqa: E402,F401  (MaskGIT generator on discrete codes)
from models import imagefolder as imagefolder  # noqa: E402,F401  (XQ-GAN SC / ImageFolder tokenizers)
from models import var as var  # noqa: E402,F401  (VAR next-scale generator)
from models import xqgan_cnn as xqgan_cnn  # noqa: E402,F401  (XQ-GAN V pipeline / LlamaGen VQ-16)

__all__ = [
    "CheckpointError",
    "create_model",
    "get_config",
    "list_models",
    "load_pretrained",
    "read_state_dict",
    "save_pretrained",
]
