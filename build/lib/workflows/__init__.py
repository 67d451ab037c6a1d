"""loraflow: distributed LoRA fine-tuning of Hugging Face language models as a Ray workflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loraflow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
