"""Online action detection speed on CPU: the streaming OadTR against re-running the windowed model per frame.

Paper-size model (REFERENCE §9.2: 3072-d TSN features, window 64, embedding 1024, 3 encoder + 5 decoder
layers, 8 queries, 22 classes; 74.7 M parameters), one video stream, eval mode, float32:

1. Per-frame latency (median over frames, cases interleaved round by round):
   * ``streaming``: ``StreamingOadTR.step`` (projects only the new frame, keeps the first decoder layer's
     query self-attention, decoder cross-attention with the key / value projections folded into the 8 queries);
   * ``window``: the windowed model on the frame's 64-frame window (what an offline evaluator runs per frame);
   * ``window, unfolded``: the same with the plain cross-attention (``fold_cross_attention=False``), as the
     released model computes it;
   * ``streaming, unfolded``: the streaming step over the unfolded model.
   Real-time factor = (1 / 4 s per THUMOS feature frame) / latency. Target: >= 4 on 2 cores.
2. Where a streaming step's time goes: the same step cut into parts (new-frame projection, each encoder
   layer's attention and MLP, the decoder's self-attention, cross-attention and FFN, heads + softmax), each
   timed alone; the parts' sum is checked against the real step's output.
3. Validation windows per second (eval, batch ``4 x --batch``) and 4. training windows per second (forward +
   backward + Adam step, batch ``--batch``), folded and unfolded.
   Besides: ``--streams`` videos stepped at once (``step`` takes ``(B, D)``): one read of the 300 MB of
   weights serves every stream, which is what a B = 1 step spends much of its time on.

Why the streaming step cannot skip the encoder: OadTR adds learned ABSOLUTE positional embeddings to the 64
tokens, so when the window slides every token's input changes and the 3 encoder layers (the largest part)
must run again. What is exact to cache: the input projection of past frames (64 -> 1 projection per frame),
the first decoder layer's query self-attention (it depends on no input), and, in every decoder layer, the
key / value projections of the 65 encoder outputs can be folded into the 8 queries (linear maps commute with
the attention average; the key bias is a per-query constant the softmax ignores), which the model does
offline too.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/action_speed.py [--frames 40] [--rounds 5] [--batch 32]``.

Measured (``--frames 20 --rounds 3 --batch 16 --train-steps 3``, 2 threads on the project's 2-core AMD EPYC VM
(AVX2, no AVX-512), load average 5-7 from other jobs throughout, so wall times are inflated; CPU times less so):
streaming 219 ms wall / 140 ms CPU per frame (real-time factor 1.1 at 4 frames/s under that load); the window
re-run 250 / 153 ms (1.15x the streaming step), the window as released, unfolded, 299 / 184 ms (1.37x); 8
streams per step 115 ms per stream and frame (1.9x the throughput of one stream). A streaming step: encoder
50 % (each layer's attention ~22 ms, MLP ~11 ms), decoder cross-attention 21 %, decoder self-attention 19 %,
decoder FFN 9 %, heads 0.1 %, new-frame projection 0.4 %. With 8 queries the decoder's many 1024 x 1024
weight matrices are read for few rows: at batch 1 the step reads all 300 MB of weights, so memory traffic,
not arithmetic, bounds it. Folding: validation 1.10x and training 1.17x the windows per second of unfolded.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: busy-waiting threads on a shared machine

import itertools  # noqa: E402
import statistics  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import Stopwatch, time_call, time_calls  # noqa: E402  (benchmarks/ is on the path when a script runs)

from lit_tasks.models.action.oadtr import OadTR, StreamingOadTR, class_probabilities  # noqa: E402

PAPER = dict(in_dim=3072, num_classes=22, window=64, embed_dim=1024)
FEATURE_RATE = 4.0  # THUMOS features per second (one per 6 frames at 24 fps, REFERENCE §9.1)


def paper_model(fold: bool, seed: int = 0) -> OadTR:
    torch.manual_seed(seed)
    model = OadTR(**PAPER, fold_cross_attention=fold)
    with torch.no_grad():
        model.queries.normal_()  # the released zero init makes every query alike
    return model.eval()


def interleaved(cases: dict[str, Callable[[int], object]], frames: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per frame of each case; ``case(t)`` processes frame t, t = 0 .. frames - 1
    in every round. Cases alternate every round. CPU time (all threads of this process) is what a busy machine
    disturbs least."""

    def frame_by_frame(case: Callable[[int], object]) -> Callable[[], object]:
        """``case`` as a call without arguments that steps through frames 0 .. frames - 1, round after round."""
        t = itertools.cycle(range(frames))
        return lambda: case(next(t))

    times = time_calls({name: frame_by_frame(case) for name, case in cases.items()}, warmup=0, repeats=rounds,
                       per_round=frames)
    return {name: (timing.median, timing.median_cpu) for name, timing in times.items()}


def latency(frames: int, rounds: int, streams: int) -> dict[str, tuple[float, float]]:
    folded, plain = paper_model(True), paper_model(False)
    plain.load_state_dict(folded.state_dict())
    stream = torch.randn(frames + 64, PAPER["in_dim"], generator=torch.Generator().manual_seed(1))
    windows = stream.unfold(0, 64, 1).transpose(1, 2)  # (frames + 1, 64, D): window ending at frame 63 + i
    many = torch.randn(frames + 64, streams, PAPER["in_dim"], generator=torch.Generator().manual_seed(2))
    detectors = {"streaming": StreamingOadTR(folded), "streaming, unfolded": StreamingOadTR(plain),
                 "batched": StreamingOadTR(folded)}
    for t in range(64):  # fill the windows, so every timed step slides them (no start padding)
        detectors["streaming"].step(stream[t])
        detectors["streaming, unfolded"].step(stream[t])
        detectors["batched"].step(many[t])

    def window(model: OadTR) -> Callable[[int], object]:
        def run(t: int) -> object:
            with torch.no_grad():
                return class_probabilities(model(windows[t + 1 : t + 2]).current)
        return run

    cases = {
        "streaming": lambda t: detectors["streaming"].step(stream[64 + t]),
        "window": window(folded),
        "window, unfolded": window(plain),
        "streaming, unfolded": lambda t: detectors["streaming, unfolded"].step(stream[64 + t]),
        f"streaming, {streams} streams per step": lambda t: detectors["batched"].step(many[64 + t]),
    }
    # Each round feeds the detectors the next frames of the stream; check once that they agree with the window.
    check = StreamingOadTR(folded)
    for f in stream[:64]:
        out = check.step(f)
    reference = window(folded)(-1)
    assert torch.allclose(out.current, reference[0], atol=1e-5), "streaming differs from the windowed model"
    return interleaved(cases, frames, rounds)


def profile_step(detector: StreamingOadTR, feature: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of each part of one streaming step (the step written out part by part)."""
    m = detector.model
    parts: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with Stopwatch() as watch:
            out = fn()
        parts[name].append(watch.wall)
        return out

    with torch.no_grad():
        for _ in range(repeats):
            new = timed("input projection (new frame)", lambda: m.input_proj(feature[None])[:, None])
            tokens = torch.cat([detector.tokens[:, 1:], new], dim=1)
            x = timed("tokens + task token + positions", lambda: torch.cat(
                [tokens, m.task_token.expand(1, -1, -1)], 1) + m.pos_embed.weight)
            for i, layer in enumerate(m.encoder):
                x = x + timed(f"encoder {i} attention (qkv, attention, proj)", lambda: layer.attn(layer.norm1(x)))
                x = x + timed(f"encoder {i} MLP", lambda: layer.mlp(layer.norm2(x)))
            memory = timed("encoder norm", lambda: m.encoder_norm(x))
            ones = F.pad(memory, (0, 1), value=1.0)
            q = m.queries
            for i, layer in enumerate(m.decoder):
                q = detector.first_self if i == 0 else timed("decoder self-attention (layers 1-4)",
                                                              lambda: layer.self_block(q))
                cross = timed("decoder cross-attention (q / out projections, attention, folded k / v)",
                              lambda: layer.cross_attn.forward_folded(q, ones) if m.fold_cross_attention
                              else layer.cross_attn(q, memory))
                q = layer.norm2(q + cross)
                q = timed("decoder FFN", lambda: layer.norm3(q + layer.ffn(q)))
            dec = m.decoder_norm(q)
            current = timed("heads + softmax", lambda: class_probabilities(
                m.current_head(torch.cat([memory[:, -1], dec.mean(1)], -1))))
    reference = detector.model.forward_tokens(tokens, first_self=detector.first_self)
    assert torch.allclose(current, class_probabilities(reference.current), atol=1e-5), "profile differs from step"
    # several calls per part and step (e.g. 4 decoder layers): sum the per-step medians
    return {name: statistics.median(ts) * (len(ts) // repeats) for name, ts in parts.items()}


def evaluation(batch: int, rounds: int) -> dict[str, float]:
    """Validation windows / s (eval, no grad), folded and unfolded cross-attention, interleaved."""
    models = {"folded": paper_model(True), "unfolded": paper_model(False)}
    x = torch.randn(batch, 64, PAPER["in_dim"], generator=torch.Generator().manual_seed(4))

    def run(model: OadTR) -> Callable[[int], object]:
        def go(_: int) -> object:
            with torch.no_grad():
                return model(x)
        return go

    times = interleaved({k: run(m) for k, m in models.items()}, 1, rounds)
    return {k: batch / wall for k, (wall, _) in times.items()}


def training(batch: int, steps: int) -> dict[str, float]:
    out = {}
    for fold in (True, False):
        model = paper_model(fold).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(batch, 64, PAPER["in_dim"], generator=g)
        y = torch.randint(0, 21, (batch,), generator=g)

        def step() -> None:
            o = model(x)
            loss = F.cross_entropy(o.current, y) + 0.5 * F.cross_entropy(o.anticipation.flatten(0, 1), y.repeat_interleave(8))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        # The warm-up step allocates Adam's state.
        out["folded" if fold else "unfolded"] = batch / time_call(step, warmup=1, repeats=steps).median
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=40, help="frames timed per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="training batch (the paper's is 128); evaluation: 4x")
    parser.add_argument("--streams", type=int, default=8, help="streams stepped at once in the batched case")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, load average {load:.2f} at start")

    lat = latency(args.frames, args.rounds, args.streams)
    print("\n1. Per-frame latency, paper-size OadTR, one stream (median per frame: wall ms, process CPU ms)")
    for name, (wall, cpu) in lat.items():
        print(f"  {name:<28} {1e3 * wall:8.2f} ms  CPU {1e3 * cpu:8.2f} ms   real-time factor at {FEATURE_RATE:g} "
              f"frames/s: {1 / (FEATURE_RATE * wall):6.1f}")
    for ref in ("window", "window, unfolded", "streaming, unfolded"):
        print(f"  {ref} / streaming: wall {lat[ref][0] / lat['streaming'][0]:.2f}x, "
              f"CPU {lat[ref][1] / lat['streaming'][1]:.2f}x")
    batched = lat[f"streaming, {args.streams} streams per step"]
    print(f"  {args.streams} streams per step: {1e3 * batched[0] / args.streams:.2f} ms wall per stream and frame, "
          f"{lat['streaming'][0] * args.streams / batched[0]:.2f}x the frames per second of one stream per step")

    for fold in (True, False):
        model = paper_model(fold)
        detector = StreamingOadTR(model)
        stream = torch.randn(65, PAPER["in_dim"], generator=torch.Generator().manual_seed(3))
        for f in stream[:64]:
            detector.step(f)
        parts = profile_step(detector, stream[64], repeats=max(5, args.rounds * 4))
        total = sum(parts.values())
        print(f"\n2. Where a streaming step goes ({'folded' if fold else 'unfolded'} cross-attention; "
              f"sum of parts {1e3 * total:.1f} ms)")
        for name, s in parts.items():
            print(f"  {name:<75} {1e3 * s:7.2f} ms  {100 * s / total:5.1f} %")

    if not args.skip_train:
        rates = evaluation(4 * args.batch, args.rounds)
        print(f"\n3. Validation windows / s (batch {4 * args.batch}, eval, no grad)")
        for name, r in rates.items():
            print(f"  {name:<10} {r:8.1f}")
        print(f"  folded / unfolded: {rates['folded'] / rates['unfolded']:.2f}x")
        rates = training(args.batch, args.train_steps)
        print(f"\n4. Training windows / s (batch {args.batch}, forward + backward + Adam)")
        for name, r in rates.items():
            print(f"  {name:<10} {r:8.1f}")
        print(f"  folded / unfolded: {rates['folded'] / rates['unfolded']:.2f}x")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.2f} at the end")


if __name__ == "__main__":
    main()
