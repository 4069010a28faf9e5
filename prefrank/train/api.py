"""The library functions the trainer calls, imported in one place.

Until the logprobs and losses branches are merged these come from the stand-ins in `_pending.py`; at merge
time this becomes `from prefrank.ops import linear_sequence_logprobs` and
`from prefrank.losses import PreferenceLossOutput, dpo_loss, listwise_dpo_loss, misp_dpo_loss, smpro_loss`.
"""

from prefrank.train._pending import (  # noqa: F401
    PreferenceLossOutput,
    dpo_loss,
    linear_sequence_logprobs,
    listwise_dpo_loss,
    misp_dpo_loss,
    smpro_loss,
)
