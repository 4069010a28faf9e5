"""The library functions the trainer calls, imported in one place."""

from prefrank.losses import (  # noqa: F401
    PreferenceLossOutput,
    dpo_loss,
    listwise_dpo_loss,
    misp_dpo_loss,
    smpro_loss,
)
from prefrank.ops import linear_sequence_logprobs  # noqa: F401
