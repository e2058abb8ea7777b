"""Prefill and large steps: stream a layer's CPU-planned experts through two device buffers
instead of computing them on the CPU.

Shape legend: T tokens, K top-k, H hidden, I expert intermediate, n_e tokens routed to expert e.

At decode the balancer's plan stands (a few tokens per expert: the CPU is often the cheaper side,
and the copy link is shared with prefetches). With many tokens per expert (a 2k-token prompt routes
~100 of 128 experts per layer at Qwen3 scale, tens of tokens each) CPU compute grows with the
tokens while a copy does not: `PrefillStreamer.should_stream` compares, for the experts the plan
sent to the CPU,

    CPU:    sum_e cpu_fixed + cpu_per_token * n_e
    stream: sum_e max(fetch, gpu_fixed + gpu_per_token * n_e)   (copy of e+1 under compute of e)

and streams when T >= `min_tokens` and the stream side is cheaper. `run` then, for each such expert
in turn, copies it from the host store into buffer (i mod 2) on a copy stream (`CopyStreams`; on a
CPU the copies are plain, in order), makes the compute stream wait for that copy, computes the
expert's rows (gathered from the device hidden states) in fp32 and adds them into the fp32 output
(`index_add_`); a buffer is refilled only after the compute that read it (an event). One upload of
every streamed expert's (token, weight) index list per layer; no host wait.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.staging import Event, ImmediateEvent, Staging

STREAM_MIN_TOKENS = 64  # below this a layer's plan stands (decode, verify windows)


class CopyStreams:
    """The copy side of the double buffer: `copy(dst, src)` on the copy stream, returning its
    event; `wait_on_compute(ev)` / `compute_waits(ev)` order the two streams; `compute_event()`
    marks the compute stream's progress. On a CPU each is immediate (copies happen in order)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None) -> Event:
        if not self.cuda:
            dst.copy_(src)
            return ImmediateEvent()
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)  # the buffer's previous reader is done
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev

    def compute_waits(self, ev: Event) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_event(ev)

    def compute_event(self) -> Event:
        if not self.cuda:
            return ImmediateEvent()
        ev = torch.cuda.Event()
        ev.record()
        return ev


@dataclass(slots=True)
class StreamCounters:
    layers: int = 0  # layer forwards that streamed
    experts: int = 0  # experts streamed
    pairs: int = 0  # (token, k) pairs computed from a streamed buffer
    bytes: int = 0


class PrefillStreamer:
    """Shared by a runtime's layers: two device buffers of one expert each (w13 [2,2I,H],
    w2 [2,H,I]), allocated at first use, sized by the first layer streamed."""

    def __init__(self, device: torch.device | str, costs: ExpertCosts,
                 min_tokens: int = STREAM_MIN_TOKENS, staging: Staging | None = None,
                 streams: CopyStreams | None = None) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens: must be >= 1, got {min_tokens}")
        self.device = torch.device(device)
        self.costs = costs
        self.min_tokens = int(min_tokens)
        self.staging = staging if staging is not None else Staging(self.device)
        self.streams = streams if streams is not None else CopyStreams(self.device)
        self._w13: torch.Tensor | None = None
        self._w2: torch.Tensor | None = None
        self._free: list[Event | None] = [None, None]  # compute done with buffer b
        self.counters = StreamCounters()

    def should_stream(self, num_tokens: int, cpu_counts: np.ndarray) -> bool:
        """cpu_counts: n_e (> 0) of each expert the plan put on the CPU."""
        if num_tokens < self.min_tokens or cpu_counts.size == 0:
            return False
        c = self.costs
        cpu = float(np.sum(c.cpu_fixed_ms + c.cpu_per_token_ms * cpu_counts))
        stream = float(np.sum(np.maximum(c.fetch_ms,
                                         c.gpu_fixed_ms + c.gpu_per_token_ms * cpu_counts)))
        return stream < cpu

    def run(self, hidden: torch.Tensor, weights: torch.Tensor, ids_np: np.ndarray,
            cpu_mask: np.ndarray, w13_host: torch.Tensor, w2_host: torch.Tensor) -> torch.Tensor:
        """fp32 [T,H]: the sum over the CPU-planned pairs of weights[t,k] * expert(ids[t,k])(x_t),
        every expert computed on the device from a streamed buffer."""
        T, K = ids_np.shape
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        flat = np.flatnonzero(cpu_mask.ravel())
        if flat.size == 0:
            return out
        experts = ids_np.ravel()[flat]
        order = np.argsort(experts, kind="stable")
        flat, experts = flat[order], experts[order]
        uniq, starts = np.unique(experts, return_index=True)
        ends = np.append(starts[1:], flat.size)
        # one upload: every streamed pair's flat (t*K + k) index, grouped by expert
        pairs = self.staging.to_device(torch.from_numpy(flat.astype(np.int64)))
        self._ensure_buffers(w13_host, w2_host)
        x32 = hidden.float()
        w_flat = weights.reshape(-1).float()
        inter = w13_host.shape[1] // 2
        nbytes = w13_host[0].numel() * w13_host.element_size() + \
            w2_host[0].numel() * w2_host.element_size()
        copies = [self._fill(0, w13_host, w2_host, int(uniq[0]))]
        for i, e in enumerate(uniq):
            b = i % 2
            if i + 1 < uniq.size:  # the next expert's copy runs under this one's compute
                copies.append(self._fill((i + 1) % 2, w13_host, w2_host, int(uniq[i + 1])))
            self.streams.compute_waits(copies[i])
            idx = pairs[starts[i]:ends[i]]
            tok = torch.div(idx, K, rounding_mode="floor")
            gu = x32[tok] @ self._w13[b].float().t()
            h = F.silu(gu[:, :inter]) * gu[:, inter:]
            y = (h @ self._w2[b].float().t()) * w_flat[idx].unsqueeze(1)
            out.index_add_(0, tok, y)
            self._free[b] = self.streams.compute_event()
        c = self.counters
        c.layers += 1
        c.experts += int(uniq.size)
        c.pairs += int(flat.size)
        c.bytes += int(uniq.size) * nbytes
        return out

    def _ensure_buffers(self, w13_host: torch.Tensor, w2_host: torch.Tensor) -> None:
        if self._w13 is None or self._w13.shape[1:] != w13_host.shape[1:] or \
                self._w2.shape[1:] != w2_host.shape[1:]:
            self._w13 = torch.empty((2, *w13_host.shape[1:]), dtype=w13_host.dtype,
                                    device=self.device)
            self._w2 = torch.empty((2, *w2_host.shape[1:]), dtype=w2_host.dtype,
                                   device=self.device)
            self._free = [None, None]

    def _fill(self, b: int, w13_host: torch.Tensor, w2_host: torch.Tensor, e: int) -> Event:
        self.streams.copy(self._w13[b], w13_host[e], self._free[b])
        return self.streams.copy(self._w2[b], w2_host[e], None)


__all__ = ["CopyStreams", "PrefillStreamer", "STREAM_MIN_TOKENS", "StreamCounters"]
