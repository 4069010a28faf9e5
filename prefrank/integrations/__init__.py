"""Optional integrations with training frameworks. Nothing here is imported by ``import prefrank``.

- ``prefrank.integrations.trl``: ``ListwiseConfig`` / ``ListwiseTrainer``, a TRL ``DPOTrainer`` drop-in for
  ranked multi-completion data (needs ``pip install trl``).
"""
