"""lit-inversion: invert frozen causal language models, as Lightning jobs.

Front doors: `invert_hidden_states` (SIP-It, hidden states -> prompt), `invert_output` (DLMI,
output -> prompt) and the `lit-inversion` CLI.
"""

from lit_inversion.dlmi import DlmiConfig, DlmiResult, GbdaConfig, GcgConfig, ReinforceConfig, invert_output
from lit_inversion.errors import InversionError
from lit_inversion.models import DEFAULT_MODEL, LoadedModel, load_model
from lit_inversion.sipit import SipItConfig, SipItResult, invert_hidden_states
from lit_inversion.sipit.api import capture_hidden_states

__all__ = [
    "DEFAULT_MODEL", "DlmiConfig", "DlmiResult", "GbdaConfig", "GcgConfig", "ReinforceConfig", "InversionError", "LoadedModel", "SipItConfig", "SipItResult", "capture_hidden_states",
    "invert_hidden_states", "invert_output", "load_model",
]
__version__ = "0.1.0"
