"""[models]: the clients' architectures and the server's."""

from __future__ import annotations

from dataclasses import dataclass

from codream_secure.config.checks import Checks
from codream_secure.config.section import Section

# Mirrors codream_secure.models.MODEL_NAMES without importing torch, so `--help` stays fast;
# tests/core/test_config.py fails if the two ever differ.
MODEL_CHOICES: tuple[str, ...] = (
    "smallcnn", "resnet8", "resnet20", "resnet18", "vgg11", "wrn16_1", "mobilenet",
)


@dataclass(frozen=True)
class ModelsConfig(Section):
    """Client architectures (cycled over the clients) and the server model's architecture."""

    SECTION = "models"
    TUPLES = ("models",)

    models: tuple[str, ...] = ("smallcnn", "resnet8", "wrn16_1", "smallcnn")
    server_model: str = "resnet8"

    def validate(self, check: Checks) -> None:
        if not self.models:
            raise check.fail("models", f"need at least one name from {', '.join(MODEL_CHOICES)}")
        for model in self.models:
            check.choice("models", model, MODEL_CHOICES)
        check.choice("server_model", self.server_model, MODEL_CHOICES)

    def client_models(self, clients: int) -> tuple[str, ...]:
        """Client k's architecture: `models` cycled (or cut) to `clients` entries."""
        return tuple(self.models[k % len(self.models)] for k in range(clients))
