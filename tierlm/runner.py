"""Model runner: a scheduled step (plain bookkeeping) -> tensors -> forward -> sampled tokens.

This is where the engine's request world meets the model's tensor world: it reads token ids,
positions and block tables from the scheduler's output, builds one flat batch, runs the
transformer, computes logits only for rows that sample, and hands them to the sampler.
"""

from __future__ import annotations

import torch

from tierlm.engine.engine import SampledToken
from tierlm.engine.scheduler import SchedulerOutput
from tierlm.model.attention import KVCache, SeqSlice, build_attention_batch
from tierlm.model.sampler import Sampler
from tierlm.model.transformer import Transformer
from tierlm.outputs import TokenLogprob


class TorchModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, device: torch.device | str = "cpu"):
        self.model = model
        self.cache = cache
        self.device = torch.device(device)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator()  # sampling runs on the CPU (see execute)
            g.manual_seed(seed)
            self._generators[request_id] = g
        return g

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        ids: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        sampling = []
        for c in out.chunks:
            req = c.request
            seqs.append(SeqSlice(query_start=len(ids), query_len=c.num_new_tokens,
                                 context_len=c.start + c.num_new_tokens, block_table=req.block_table))
            ids.extend(req.all_token_ids[c.start:c.start + c.num_new_tokens])
            if c.samples:
                sample_rows.append(len(ids) - 1)
                sampling.append(req)
        hidden = self._forward(ids, seqs)
        if not sampling:
            return {}
        # Sampling runs on the CPU whatever the device: B x vocab floats are cheap to move, and
        # seeded draws then give the same tokens on every device.
        logits = self.model.logits(hidden[sample_rows]).cpu()  # (num_sampling, vocab) float32
        result = self.sampler(
            logits,
            [r.params for r in sampling],
            [r.prompt_token_ids for r in sampling],
            [r.output_token_ids for r in sampling],
            [self._generator(r.request_id, r.params.seed) for r in sampling],
        )
        sampled = {}
        for r, tok, lp in zip(sampling, result.token_ids, result.logprobs):
            logprob = None if lp is None else TokenLogprob(lp.token_id, lp.logprob, lp.top)
            sampled[r.request_id] = SampledToken(int(tok), logprob)
        return sampled

    def _forward(self, ids: list[int], seqs: list[SeqSlice]) -> torch.Tensor:
        batch = build_attention_batch(seqs, self.cache.block_size, self.model.layer_windows, self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return self.model.forward(input_ids, batch, self.cache)

    @torch.inference_mode()
    def score(self, token_ids: list[int], block_table: list[int], chunk: int) -> torch.Tensor:
        """Logits (T, vocab) float32 at every position of one sequence, prefilled in ``chunk``-token
        pieces through the paged cache (the blocks must already cover all T tokens)."""
        parts = []
        for start in range(0, len(token_ids), chunk):
            piece = token_ids[start:start + chunk]
            seq = SeqSlice(query_start=0, query_len=len(piece), context_len=start + len(piece), block_table=block_table)
            parts.append(self.model.logits(self._forward(piece, [seq])))
        return torch.cat(parts)
