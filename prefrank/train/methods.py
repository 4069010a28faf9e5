"""Training methods: which (image, response) sequences each record contributes, and the loss on their
log-probs. A method is a small class registered in `METHODS`; new ones (e.g. online SMPRO rounds) subclass
`Method` and register themselves.

Every batch becomes ONE forward: a flat list of log-probs plus `positions[b, j]`, the flat index of record
b's j-th request (-1 = none), so each method reshapes the flat log-probs into its own (B, K) layout. Two
layouts give the flat list: one row per request `[prompt, response]` (`collate`), or, when every request
of a record is on its own image (`Method.packable`), one row per record holding the prompt once followed
by all of its responses (`collate_packed`, prefrank.packing): the prompt and its image run once instead of
K times, with identical log-probs. MISP-DPO scores one response under K+1 different images: no shared
prefix, it stays unpacked.
"""

from dataclasses import dataclass, field

import torch

from prefrank.train import api
from prefrank.train.model import collate, collate_packed

CLEAN = -1  # image slot of the record's own image; k >= 0 is its k-th negative image


@dataclass
class EncodedRecords:
    """Records with their processor outputs cached (prompt per image slot, token ids per response)."""

    records: list
    prompts: list  # prompts[i] = encoded prompt on the clean image
    negative_prompts: list  # negative_prompts[i][k] = encoded prompt on the k-th negative image
    responses: list  # responses[i][j] = token ids of response j (eos-terminated)
    pad_id: int

    @classmethod
    def build(cls, vlm, records, with_negatives=False):
        prompts = [vlm.encode_prompt(r.image, r.question) for r in records]
        negatives = [[vlm.encode_prompt(image, r.question) for image in r.negative_images] if with_negatives
                     else [] for r in records]
        responses = [[vlm.encode_response(text) for text in r.responses] for r in records]
        return cls(records, prompts, negatives, responses, vlm.pad_id)

    def __len__(self):
        return len(self.records)

    def prompt(self, index, slot):
        return self.prompts[index] if slot == CLEAN else self.negative_prompts[index][slot]


@dataclass
class SequenceBatch:
    indices: list  # record indices
    inputs: dict  # packed model inputs
    labels: torch.Tensor  # completion-token labels aligned with the hidden states
    positions: torch.Tensor  # (B, K) flat sequence index of each request, -1 = none
    extras: dict  # per-method tensors (groups, log_q …)
    segments: dict = field(default_factory=dict)  # packed: segment_ids, num_segments (scorer keywords)

    def to(self, device):
        self.inputs = {k: v.to(device) for k, v in self.inputs.items()}
        self.labels = self.labels.to(device)
        self.positions = self.positions.to(device)
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        self.segments = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.segments.items()}
        return self

    @property
    def num_sequences(self):
        """Length of the flat log-prob vector the scorer returns."""
        return self.segments["num_segments"] if self.segments else self.labels.shape[0]


def gather_logps(flat, positions):
    """(N,) flat log-probs → (B, K) by positions; missing entries are 0 (callers mask them)."""
    return flat[positions.clamp(min=0)].masked_fill(positions < 0, 0.0)


def _best_and_worst(record, where):
    levels = [g for g in record.groups if g >= 0]
    best, worst = min(levels), max(levels)
    if best == worst:
        raise ValueError(f"{where}: a pairwise method needs two preference levels, got {record.groups}")
    return record.groups.index(best), record.groups.index(worst)


class Method:
    name = ""
    needs_reference = True
    needs_negatives = False
    packable = True  # every request is on the record's own image: build_batch(packed=True) works

    def requests(self, record, where):
        """[(image slot, response index)] this method scores for a record."""
        raise NotImplementedError

    def extras(self, records):
        return {}

    def loss(self, policy, reference, batch, config):
        """`policy`/`reference`: flat log-probs of the batch's sequences; returns PreferenceLossOutput."""
        raise NotImplementedError

    @staticmethod
    def loss_kwargs(config, default_beta=None):
        kwargs = dict(config.loss_kwargs)
        beta = config.beta if config.beta is not None else default_beta
        if beta is not None:
            kwargs["beta"] = beta
        return kwargs

    def build_batch(self, data, indices, packed=False):
        """The batch of records `indices`: one row per request, or (packed) one row per record."""
        if packed:
            return self._build_packed_batch(data, indices)
        flat_prompts, flat_responses, rows = [], [], []
        for index in indices:
            requests = self.requests(data.records[index], f"record {index}")
            rows.append(list(range(len(flat_prompts), len(flat_prompts) + len(requests))))
            for slot, response in requests:
                flat_prompts.append(data.prompt(index, slot))
                flat_responses.append(data.responses[index][response])
        width = max(len(row) for row in rows)
        positions = torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)
        inputs, labels = collate(data.pad_id, flat_prompts, flat_responses)
        return SequenceBatch(list(indices), inputs, labels, positions,
                             self.extras([data.records[i] for i in indices]))

    def _build_packed_batch(self, data, indices):
        prompts, responses = [], []
        for index in indices:
            requests = self.requests(data.records[index], f"record {index}")
            if any(slot != CLEAN for slot, _ in requests):
                raise ValueError(f"{self.name}: record {index} scores responses under other images; it "
                                 "cannot share one prompt (run unpacked)")
            prompts.append(data.prompt(index, CLEAN))
            responses.append([data.responses[index][response] for _, response in requests])
        inputs, labels, segments, mask = collate_packed(data.pad_id, prompts, responses)
        slots = torch.arange(mask.numel()).view(mask.shape)  # segment slot b·K + k = flat index
        positions = torch.where(mask, slots, -1)
        return SequenceBatch(list(indices), inputs, labels, positions,
                             self.extras([data.records[i] for i in indices]), segments)


class SFT(Method):
    """Token-mean negative log-likelihood of every most-preferred response."""

    name, needs_reference = "sft", False

    def requests(self, record, where):
        best = min(g for g in record.groups if g >= 0)
        return [(CLEAN, j) for j, g in enumerate(record.groups) if g == best]

    def loss(self, policy, reference, batch, config):
        # the trainer sets token_normaliser so that accumulation + the DDP average give the global token mean
        normaliser = batch.extras.get("token_normaliser")
        if normaliser is None:
            normaliser = (batch.labels != -100).sum().clamp(min=1)
        loss = -policy.sum() / normaliser
        return api.PreferenceLossOutput(loss, {})


class DPO(Method):
    """Pairwise DPO on (first most-preferred, first least-preferred) response of each record."""

    name = "dpo"

    def requests(self, record, where):
        chosen, rejected = _best_and_worst(record, where)
        return [(CLEAN, chosen), (CLEAN, rejected)]

    def loss(self, policy, reference, batch, config):
        pol, ref = gather_logps(policy, batch.positions), gather_logps(reference, batch.positions)
        return api.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], **self.loss_kwargs(config))


class Listwise(Method):
    """Listwise DPO (Plackett-Luce over implicit rewards) on every valid response with its group level."""

    name = "listwise"

    def requests(self, record, where):
        return [(CLEAN, j) for j, g in enumerate(record.groups) if g >= 0]

    def extras(self, records):
        rows = [[g for g in r.groups if g >= 0] for r in records]
        width = max(len(row) for row in rows)
        return {"groups": torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)}

    def loss(self, policy, reference, batch, config):
        pol, ref = gather_logps(policy, batch.positions), gather_logps(reference, batch.positions)
        return api.listwise_dpo_loss(pol, ref, groups=batch.extras["groups"], **self.loss_kwargs(config))


class SMPRO(Listwise):
    """SMPRO's group loss on the record's groups (issue 7 adds self-generated groups)."""

    name = "smpro"

    def loss(self, policy, reference, batch, config):
        pol, ref = gather_logps(policy, batch.positions), gather_logps(reference, batch.positions)
        return api.smpro_loss(pol, ref, batch.extras["groups"], **self.loss_kwargs(config))


class MISPDPO(Method):
    """MISP-DPO: the chosen response on the clean image vs on each negative image (image side), plus DPO on
    (chosen, rejected) on the clean image (text side). Unpacked: the image side scores one response under
    K+1 different images, so its rows share no prompt prefix."""

    name, needs_negatives, packable = "misp_dpo", True, False

    def requests(self, record, where):
        if not record.negative_images:
            raise ValueError(f"{where}: misp_dpo needs negative_images")
        chosen, rejected = _best_and_worst(record, where)
        negatives = [(k, chosen) for k in range(len(record.negative_images))]
        return [(CLEAN, chosen), (CLEAN, rejected), *negatives]

    def extras(self, records):
        width = max(len(r.negative_images) for r in records)
        log_q = torch.zeros(len(records), width)
        has_q = [r.negative_log_q is not None for r in records]
        if any(has_q) and not all(has_q):
            raise ValueError("misp_dpo: negative_log_q must be given for all records of a batch or none")
        for row, record in enumerate(records):
            if record.negative_log_q is not None:
                log_q[row, :len(record.negative_log_q)] = torch.tensor(record.negative_log_q)
        return {"log_q": log_q} if all(has_q) else {}

    def loss(self, policy, reference, batch, config):
        pol, ref = gather_logps(policy, batch.positions), gather_logps(reference, batch.positions)
        mask = batch.positions[:, 2:] >= 0
        return api.misp_dpo_loss(pol[:, 0], ref[:, 0], pol[:, 2:], ref[:, 2:],
                                 log_q=batch.extras.get("log_q"), mask=mask,
                                 text=(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1]),
                                 **self.loss_kwargs(config))


METHODS = {method.name: method for method in (SFT, DPO, Listwise, SMPRO, MISPDPO)}
