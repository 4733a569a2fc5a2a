"""The preprocessing stage: Speech Commands audio in, MFCC frame sequences out."""

from data_prep.errors import SpeechRNNError
from data_prep.features import FeatureConfig, mfcc

__all__ = ["FeatureConfig", "SpeechRNNError", "mfcc"]
