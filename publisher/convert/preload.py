"""The libraries an isolated step's process uses, imported once by the fork server (`coreml.run_isolated`).

Importing them is most of a fresh process's start (~6 s); a step forked from a server that holds them starts at
once. Only imports here: nothing may run a model (a thread pool started here would be broken in every fork).
"""

from publisher.mlpackage import import_coremltools

import_coremltools()

import diffusers.models  # noqa: E402,F401  (diffusers imports its model classes lazily: make it load them now)
import safetensors.torch  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers.models.clip.modeling_clip  # noqa: E402,F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402,F401
