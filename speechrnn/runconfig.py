"""TrainConfig: everything a run needs, saved as run/config.json so a run can be resumed,
exported and reproduced without repeating the command line."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.augment import AugmentConfig
from data_prep.dataset import TaskConfig
from data_prep.errors import SpeechRNNError
from data_prep.features import FeatureConfig
from speechrnn.models import ModelConfig


@dataclass
class TrainConfig:
    data: list[str]  # Speech Commands folders: their training split trains, validation split selects
    train_only: list[str] = field(default_factory=list)  # folders used whole for training (synthetic speech)
    task: TaskConfig = field(default_factory=TaskConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to lr*1e-2 over the remaining epochs
    clipnorm: float = 1.0  # global-norm clipping; 0 turns it off
    clipvalue: float = 0.0  # per-element clipping instead (used when clipnorm is 0)
    patience: int = 8  # early stopping on validation accuracy
    balance: float = 0.25  # oversample each label's real clips to this fraction of the median real label count
    max_per_label: int = 0  # cap training examples per label (0: all); for quick tests
    seed: int = 0
    # How the --train-only folders' words outside the task train: "sampled" (the folders pooled, and
    # unknown_fraction x their task-word clips drawn, as for --data) or "all" (every clip).
    train_only_unknown: str = "sampled"
    # Domain-adversarial training (Ganin and Lempitsky, 2015): a second head learns to tell real
    # (--data) from synthetic (--train-only) speech on the pooled features, and the features are
    # pushed, through a gradient-reversal layer of this strength (ramped up from 0 over the run),
    # to make it fail. 0 turns it off. The exported model has no such head.
    domain_adversarial: float = 0.0
    # Running speech with no command in it (folders of recordings of any length, e.g. `speechrnn data
    # sentences`): each epoch adds negatives_fraction x its examples as one-second windows cut at
    # random from them, labelled _unknown_. What a detector hears most in a room where people talk.
    negatives: list[str] = field(default_factory=list)
    negatives_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.train_only_unknown not in ("sampled", "all"):
            raise ValueError(f"train_only_unknown must be 'sampled' or 'all', not {self.train_only_unknown!r}")
        if self.domain_adversarial < 0:
            raise ValueError("domain_adversarial must be >= 0")
        if self.negatives_fraction < 0 or (self.negatives_fraction > 0 and not self.negatives):
            raise ValueError("negatives_fraction must be >= 0, and > 0 only with negatives folders (--negatives DIR)")

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in asdict(self).items() if k not in ("task", "features", "model", "augment")},
            "task": self.task.to_dict(),
            "features": self.features.to_dict(),
            "model": self.model.to_dict(),
            "augment": self.augment.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        return cls(
            task=TaskConfig.from_dict(data.pop("task")),
            features=FeatureConfig.from_dict(data.pop("features")),
            model=ModelConfig.from_dict(data.pop("model")),
            augment=AugmentConfig.from_dict(data.pop("augment")),
            **data,
        )

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise SpeechRNNError("no config.json: not a speechrnn run folder", Path(path).parent) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise SpeechRNNError(f"config is not a valid speechrnn training config ({exc})", path) from None


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
