"""speechrnn: a keyword spotter built on stacked bidirectional recurrent networks."""

from data_prep.errors import SpeechRNNError

__all__ = ["SpeechRNNError", "__version__"]
__version__ = "0.1.0"
