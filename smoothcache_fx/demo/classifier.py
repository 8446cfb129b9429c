"""A tiny CNN digits classifier that scores demo samples: "is this still the digit we asked for?".

Trained by `python -m smoothcache_fx.demo.train` on scikit-learn's 8x8 digits; its weights ship in
the package so scoring needs only torch at run time (scikit-learn is needed for training alone).
"""

from __future__ import annotations

import torch
from torch import nn

from smoothcache_fx.demo.weights import load_shipped_weights

CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions, one pooling, two linear layers: ~80k parameters for 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, 64), nn.ReLU())
        self.out = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, 10] for images [B, 1, 8, 8] in [-1, 1]."""
        return self.out(self.head(self.features(images)))


def load_digits_classifier(device: str | torch.device = "cpu") -> DigitsClassifier:
    """Returns the shipped classifier in eval mode."""
    model = load_shipped_weights(DigitsClassifier(), CLASSIFIER_WEIGHTS, "classifier")
    return model.to(device).eval()


@torch.no_grad()
def classify(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> torch.Tensor:
    """Predicted labels [B] for images [B, 1, 8, 8] (or [B, 8, 8]) in [-1, 1]."""
    classifier = classifier if classifier is not None else load_digits_classifier()
    param = next(classifier.parameters())
    images = images.reshape(-1, 1, 8, 8).to(device=param.device, dtype=param.dtype)
    return classifier(images).argmax(dim=1)
