"""MVC: Dataset Augmentation by Mixing Visual Concepts (reference implementation).

Importing the package imports every module that publishes config choices or rules into `mvc.core.registry`
(timm's pattern: the registry at the bottom, filled from above), so that `mvc.core.config`, which imports none
of them, validates a config against every dataset, captioner, strategy, sampler and generator. None of these
modules imports diffusers, transformers, timm, torchvision or matplotlib when it is imported.
"""

# the publishers, imported for what they publish (F401)
from mvc.classifier import augment, engine, probe, strategies  # noqa: F401
from mvc.core import distributed, schedules  # noqa: F401
from mvc.data import captions, pairs, prompts  # noqa: F401
from mvc.diffusion import clustering, conditioning, dreambooth, finetune_loop, finetune_setup, models, textual_inversion  # noqa: F401
from mvc.generation import curation, generators, mixing  # noqa: F401

__version__ = "0.1.0"
