"""Benchmarks that print ratios measured in one run: decoding at every depth and with the sub-models'
speed-ups, and the cost of a SoFT train step.

  python bench.py                                  # both, on random LLaMA-shaped weights (dim 1024, 16 layers)
  python bench.py --only decode --ckpt out         # the trained demo: task prompts, accuracy, speed-ups
  python bench.py --only decode --ckpt out --compile --cycles 2,3   # and where a speculative cycle's time goes
  python bench.py --only batch --ckpt out --draft_layers 2 --batches 1,4,16,64   # batched self-speculation
  python bench.py --only train                     # sorted vs sft vs transformers, 13B's shape scaled down
  python bench.py --json bench.json --plot bench.png

Decoding, batch 1, greedy, every configuration on the same weights in one process, taking turns prompt by
prompt (these machines are noisy and have slow spells), medians of rounds reported: plain decoding at each
exit (against the ideal speed-up, bytes(full) / bytes(k), that the weights read per token allow),
self-speculative decoding drafting with each exit, confidence-based early exit at a few thresholds, transformers'
generate on the same weights and, where the installed version has it, its assistant_early_exit self-speculation.
With a checkpoint trained on the built-in tasks the prompts are held-out tasks: each configuration's answers are
checked for exact match and against the full model's greedy answers. Besides end to end, the decode phase (from
the first new token to the last: the prompt's pass, which speculation leaves alone, apart) on the long answers.
--cycles K1,K2: where a self-speculative decode's time goes (drafting, verifying, the rest) and the limit that
measured step times allow. --only batch --draft_layers K: batched self-speculation against batched full depth.

Train step: forward, backward and AdamW step of --mode sorted (8 exits, like 13B's 12..40) and --mode sft on
a model with 13B's depth and vocabulary-to-width ratio, and transformers' LlamaForCausalLM doing the same
forward and backward, timed in interleaved rounds in one process; peak memory from a process for each.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from checkpoints import CheckpointError, read_json, resolve, trained_exits
from data import DataError, alpaca_prompt, held_out
from flags import FlagError, parse_depths
from decoding.speculative import speculate
from decoding.step import layers_fn, open_cache
from generate import generate, generate_batch
from load_llama import hf_config, hf_state_dict, load_model
from model import ModelArgs, Transformer, default_exits, fresh_weights
from scale.fused_ce import SortedObjective
from soft import sorted_loss
from tasks import exact_match
from tokenizer import load_tokenizer


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in fresh_weights(model, seed):
            params[name].copy_(value)
    return model


def hf_model(model: Transformer, layers: int | None = None):
    """transformers' LlamaForCausalLM holding the same weights, or None if transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    layers = layers or model.args.n_layers
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.args, layers)))
    hf.load_state_dict(hf_state_dict(model, layers), strict=True)
    return hf


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(configs: dict, rounds: int) -> tuple[dict, dict]:
    """(median, best) seconds of each configuration, run round-robin so that drift hits all alike."""
    for fn in configs.values():  # warm-up
        fn()
    times = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            times[name].append(timed(fn))
    return ({name: statistics.median(t) for name, t in times.items()}, {name: min(t) for name, t in times.items()})


def interleaved_by_item(configs: dict, items: list, rounds: int) -> tuple[dict, dict]:
    """Median over rounds of each configuration's seconds for all items, end to end and in the decode phase (the
    "decode_s" its stats report: from the first new token to the last), the configurations taking turns item by
    item, in an order that rotates, so that a slow spell of the machine falls on all of them alike."""
    names, times, decode = list(configs), {name: [] for name in configs}, {name: [] for name in configs}
    for r in range(rounds):
        total, phase = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for j, item in enumerate(items):
            first = (r * len(items) + j) % len(names)
            for name in names[first:] + names[:first]:
                t0 = time.perf_counter()
                _, stats = configs[name](item)
                total[name] += time.perf_counter() - t0
                phase[name] += sum(s.get("decode_s", float("nan")) for s in stats)
        for name in names:
            times[name].append(total[name])
            decode[name].append(phase[name])
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: statistics.median(t) for name, t in decode.items()})


# --- decoding

def weight_bytes(model: Transformer, depth: int) -> int:
    """Bytes of weights one decoded token reads at this depth: its blocks, the final norm and the head."""
    blocks = sum(p.numel() * p.element_size() for p in model.layers[:depth].parameters())
    norm, output = model.exit_head(depth)
    return blocks + sum(p.numel() * p.element_size() for p in norm.parameters()) + output.weight.nbytes


def decode_workload(ckpt: str | None, model: Transformer, num_eval: int, prompt_len: int, new_tokens: int,
                    n_random: int = 4):
    """(prompts, references, tokenizer, max_new_tokens): held-out built-in tasks for a checkpoint trained on them,
    else n_random random prompts and a fixed number of new tokens."""
    if ckpt:
        config = read_json(os.path.join(resolve(ckpt), "params.json")).get("train_config") or {}
        records = held_out(config)[:num_eval]
        if records and "task" in records[0]:
            tok = load_tokenizer(ckpt)
            prompts = [tok.encode(alpaca_prompt(r["instruction"], r["input"])) for r in records]
            return prompts, [r["output"] for r in records], tok, 64
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.args.vocab_size, (n_random, prompt_len), generator=g).tolist()
    return prompts, None, None, new_tokens


def long_answers(refs: list[str], tok) -> list[int]:
    """The indices of the references 6 tokens or longer: the prompts where decoding, not the prompt's pass, takes the
    time."""
    return [i for i, r in enumerate(refs) if len(tok.encode(r, bos=False)) >= 6]


def decode_configs(model, depths, exits, max_new: int, eos, speculate: bool, num_speculations: int,
                   draft_confidence: float, thresholds: list, with_hf: bool, compile: bool = False) -> dict:
    """Every configuration to time, by name: a function of a list of prompts returning (outputs, stats)."""
    n = model.args.n_layers

    def ours(**kw):
        def run(ps):
            outs, stats = [], []
            for p in ps:
                stats.append({})
                seen = []  # when each new token came: the decode phase is from the first to the last
                outs.append(generate(model, p, max_new, eos_id=eos, stats=stats[-1],
                                     on_token=lambda _: seen.append(time.perf_counter()), **kw))
                stats[-1]["decode_s"] = seen[-1] - seen[0] if seen else 0.0
            return outs, stats
        return run

    configs = {f"depth {d}": ours(layers=d) for d in depths}
    for k in [d for d in depths if d < n and speculate]:
        configs[f"self-speculative K={k}"] = ours(draft_layers=k, num_speculations=num_speculations,
                                                  draft_confidence=draft_confidence)
    for t in thresholds if speculate else []:
        name = f"early exit {t:g}" if isinstance(t, float) else "early exit " + ",".join(f"{x:g}" for x in t)
        configs[name] = ours(early_exit=t, exits=exits)
    if compile:  # the same decoding through compiled graphs (generate.layers_fn)
        configs[f"compiled depth {n}"] = ours(layers=n, compile=True)
        for k in [d for d in depths if d < n and speculate]:
            configs[f"compiled self-speculative K={k}"] = ours(draft_layers=k, num_speculations=num_speculations,
                                                               draft_confidence=draft_confidence, compile=True)
    hf = hf_model(model) if with_hf else None
    if hf is not None:
        def hf_run(**kw):
            def run(ps):
                outs = []
                for p in ps:
                    ids = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                                      eos_token_id=eos, **({} if eos else {"min_new_tokens": max_new}), **kw)
                    outs.append([t for t in ids[0, len(p):].tolist() if t != eos])
                return outs, [{} for _ in ps]
            return run
        configs["HF generate"] = hf_run()
        if hasattr(hf.generation_config, "assistant_early_exit"):  # transformers' LayerSkip-style self-speculation
            for k in [d for d in depths if d < n and speculate]:
                configs[f"HF assistant_early_exit={k}"] = hf_run(assistant_early_exit=k)
    return configs


PAPER_THRESHOLDS = {0.3: 0.95, 0.4: 0.95, 0.5: 0.9, 0.6: 0.9, 0.7: 0.8, 0.8: 0.8, 0.9: 0.7}  # 13B: layers 12..36 of 40


def exit_thresholds(text: str, below_last: list[int], n_layers: int) -> list[list[float]]:
    """--exit_thresholds as a list of one threshold list (or none): given, or the paper's at the nearest depth."""
    if text == "none" or not below_last:
        return []
    if text == "paper":
        return [[PAPER_THRESHOLDS[min(PAPER_THRESHOLDS, key=lambda f: abs(f - e / n_layers))] for e in below_last]]
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise FlagError(f"--exit_thresholds {text!r}: expected comma-separated numbers, 'paper' or 'none'")
    if len(values) != len(below_last):
        raise FlagError(f"--exit_thresholds has {len(values)} values for the {len(below_last)} exits {below_last}")
    return [values]


def bench_decode(model, label: str, configs: dict, prompts, refs, tok, rounds: int, num_prompts: int) -> list[dict]:
    """Time every configuration on the prompts, check its answers, print the table; the rows."""
    n = model.args.n_layers
    # timed workloads: the held-out mix, and (trained checkpoint) the prompts whose answers are long, where
    # decoding rather than the prompt's prefill takes the time
    workloads = {"all": list(range(len(prompts)))[:num_prompts]}  # indices into prompts
    if refs:
        long = long_answers(refs, tok)
        workloads = {"all tasks": workloads["all"], "long answers": long[:num_prompts]}
    workloads = {w: idx for w, idx in workloads.items() if idx}  # a checkpoint whose tasks all answer short has none
    with torch.inference_mode():
        first_pass, results = {}, {}
        for name, fn in configs.items():  # outputs on every prompt, untimed: the warm-up, and compiling
            t0 = time.perf_counter()
            results[name] = fn(prompts)
            first_pass[name] = time.perf_counter() - t0
        seconds, decode_s = {}, {}
        for w, idx in workloads.items():
            per_prompt = {name: (lambda i, fn=fn: fn([prompts[i]])) for name, fn in configs.items()}
            total, phase = interleaved_by_item(per_prompt, idx, rounds)
            seconds.update({(name, w): s for name, s in total.items()})
            decode_s.update({(name, w): s for name, s in phase.items()})
    tps = {(name, w): sum(len(results[name][0][i]) for i in workloads[w]) / seconds[name, w] for name, w in seconds}
    last = list(workloads)[-1]  # the decoding-bound workload: its decode phase, and the comparison with the ideal
    # the decode phase: the tokens after the first (which the prompt's pass gives) over the time from first to last
    decode_tps = {name: sum(max(len(results[name][0][i]) - 1, 0) for i in workloads[last])
                  / max(decode_s[name, last], 1e-9) for name in configs}  # 0 where every answer is one token
    full_outs, args = results[f"depth {n}"][0], model.args
    timed_on = (f"timed on {len(workloads['all tasks'])} held-out task prompts, and on "
                f"{len(workloads.get('long answers', []))} with answers of 6+ tokens; answers checked on "
                f"{len(prompts)}" if refs else
                f"{len(prompts)} prompts of {len(prompts[0])} tokens, {len(full_outs[0])} new tokens each")
    print(f"\ndecoding: {label}; {n} layers, dim {args.dim}, heads {args.n_heads}/{args.n_kv_heads}, vocab "
          f"{args.vocab_size}, float32, batch 1, greedy; {timed_on}; {torch.get_num_threads()} threads, median of "
          f"{rounds} rounds, configurations interleaved prompt by prompt")
    print(f"{'configuration':<28}" + "".join(f"{w + ' tok/s':>20}{'x':>6}" for w in workloads)
          + f"{'decode phase':>13}{'x':>6}{'x mode':>7}{'ideal':>7}{'of ideal':>9}{'accept':>8}{'mean exit':>10}"
          + f"{'= full':>7}"
          + (f"{'accuracy':>9}" if refs else ""))
    rows = []
    for name in configs:
        outs, stats = results[name]
        row = dict(name=name, identical_to_full=outs == full_outs)
        for w in workloads:
            row[f"tokens_per_s ({w})"] = round(tps[name, w], 2)
            row[f"speedup ({w})"] = round(tps[name, w] / tps[f"depth {n}", w], 3)
        # the decode phase of the last workload, against full depth, and against the same mode's (eager or compiled)
        same_mode = f"compiled depth {n}" if name.startswith("compiled") else f"depth {n}"
        row[f"decode_tokens_per_s ({last})"] = round(decode_tps[name], 2)
        row[f"decode_speedup ({last})"] = round(decode_tps[name] / decode_tps[f"depth {n}"], 3)
        row[f"decode_speedup_same_mode ({last})"] = round(decode_tps[name] / decode_tps[same_mode], 3)
        if name.startswith("depth"):
            d = int(name.split()[1])
            row["ideal"] = round(weight_bytes(model, n) / weight_bytes(model, d), 3)
            row["of_ideal"] = round(row[f"speedup ({last})"] / row["ideal"], 3)
        if "acceptance" in stats[0]:
            row["acceptance"] = round(sum(s["accepted"] for s in stats) / max(1, sum(s["drafted"] for s in stats)), 3)
        if "mean_exit_depth" in stats[0]:
            depth_list = [d for s in stats for d in s.get("exit_depths", [])]
            row["mean_exit_depth"] = round(sum(depth_list) / len(depth_list), 2)
        if refs:
            row["accuracy"] = round(sum(exact_match(tok.decode(o), r) for o, r in zip(outs, refs)) / len(refs), 4)
        if name.startswith("compiled"):  # the first pass over all prompts, less what it takes once compiled
            steady = sum(len(o) for o in outs) / tps[name, list(workloads)[0]]
            row["compile_s"] = round(first_pass[name] - steady, 1)
        rows.append(row)
        print(f"{name:<28}"
              + "".join(f"{row[f'tokens_per_s ({w})']:>20.1f}{row[f'speedup ({w})']:>6.2f}" for w in workloads)
              + f"{decode_tps[name]:>13.1f}{row[f'decode_speedup ({last})']:>6.2f}"
              + f"{row[f'decode_speedup_same_mode ({last})']:>7.2f}"
              + (f"{row['ideal']:>7.2f}{row['of_ideal']:>9.0%}" if "ideal" in row else " " * 16)
              + (f"{row['acceptance']:>8.0%}" if "acceptance" in row else " " * 8)
              + (f"{row['mean_exit_depth']:>10.2f}" if "mean_exit_depth" in row else " " * 10)
              + f"{'yes' if row['identical_to_full'] else 'no':>7}"
              + (f"{row['accuracy']:>9.1%}" if refs else "")
              + (f"   compiling took about {row['compile_s']:.0f} s" if "compile_s" in row else ""))
    return rows


def step_seconds(fns: dict, rounds: int = 10, calls: int = 10) -> dict:
    """Median seconds of one call of each fn, after a warm-up: in rounds, each fn called `calls` times in a row (as
    a decode calls its steps, on weights that stay in the CPU's caches) and the fns in turn, so that drift hits all
    alike and their ratios hold even where the machine's speed moves from one minute to the next."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k] += [timed(fn) for _ in range(calls)]
    return {k: statistics.median(t) for k, t in times.items()}


def bench_cycle(model, prompts, drafts: list[int], N: int, confidence: float, max_new: int, eos, compile: bool,
                rounds: int) -> list[dict]:
    """Where a batch-1 self-speculative decode's time goes (the prompt's pass, drafting, verifying, and the rest:
    sampling, acceptance and bookkeeping), and the limit that measured layer passes allow: a full-depth token costs
    one full-depth step; a cycle of N drafts all accepted costs N + 1 draft steps (K layers and the head, one token)
    and one verification (L - K layers and the head on N + 1 tokens) for N + 1 tokens."""
    L, device = model.args.n_layers, model.output.weight.device
    layers = layers_fn(model, compile)
    mode = "compiled" if compile else "eager"
    rows = []
    with torch.inference_mode():
        # one-token steps at a column halfway into a cache of the size these decodes use
        size, col = max(map(len, prompts)) + max_new, max(map(len, prompts))
        x1, pos, h = torch.tensor([[5]]), torch.tensor([col]), torch.zeros(1, N + 1, model.args.dim)
        open_cache(model, 1, size, static=compile)  # the full-depth baseline: the plain cache, eager
        plain = [layer.attention.cache for layer in model.layers]
        open_cache(model, 1, size, static=True)  # speculation's
        static = [layer.attention.cache for layer in model.layers]
        model.drop_cache()

        def on(caches, fn):  # fn on these caches, so that steps on both kinds can be timed in turn
            def call():
                for layer, cache in zip(model.layers, caches):
                    layer.attention.cache = cache
                return fn()
            return call
        steps = step_seconds({"full": on(plain, lambda: layers(x1, col if not compile else pos, 0, L)),
                              **{("draft", K): on(static, lambda K=K: layers(x1, pos, 0, K)) for K in drafts},
                              **{("verify", K): on(static, lambda K=K: layers(h, pos, K, L, every=True))
                                 for K in drafts}})
        model.drop_cache()
        full = steps["full"]
        for K in drafts:
            spent = dict.fromkeys(("prefill", "draft", "verify", "total"), 0.0)

            def timed_layers(x, p, first, last, pad=None, every=False):
                t0 = time.perf_counter()
                result = layers(x, p, first, last, pad, every)
                spent["prefill" if last == L and first == 0 else "draft" if first == 0 else "verify"] += \
                    time.perf_counter() - t0
                return result
            for r in range(rounds + 1):  # the first round warms up (and compiles)
                drafted = accepted = 0  # over every prompt of the round: the last round's count
                if r == 1:
                    spent = dict.fromkeys(spent, 0.0)
                for p in prompts:
                    open_cache(model, 1, len(p) + max_new, static=True)
                    stats, t0 = {}, time.perf_counter()
                    speculate(model, torch.tensor([p], device=device), None, timed_layers, K=K, N=N,
                              confidence=confidence, max_new=max_new, eos_id=eos, sampling=(0.0, None, None, None),
                              stats=stats)
                    spent["total"] += time.perf_counter() - t0
                    drafted, accepted = drafted + stats.get("drafted", 0), accepted + stats.get("accepted", 0)
                    model.drop_cache()
            draft, verify = steps["draft", K], steps["verify", K]
            limit = (N + 1) * full / ((N + 1) * draft + verify)
            other = spent["total"] - spent["prefill"] - spent["draft"] - spent["verify"]
            decode = spent["total"] - spent["prefill"]
            rows.append(dict(mode=mode, K=K, full_step_ms=round(full * 1e3, 3), draft_step_ms=round(draft * 1e3, 3),
                             verify_ms=round(verify * 1e3, 3), limit=round(limit, 2),
                             share_draft=round(spent["draft"] / decode, 3),
                             share_verify=round(spent["verify"] / decode, 3), share_other=round(other / decode, 3),
                             acceptance=round(accepted / max(drafted, 1), 3)))
    print(f"\nself-speculative cycles, batch 1, {mode}, N={N} drafts a cycle at most, confidence {confidence}: one "
          f"step's time (median of 10 rounds of 10 calls, the steps taking turns), the limit they allow (N drafts "
          f"all accepted: (N+1) full steps against N+1 draft steps and one verification of N+1 tokens), and where the "
          f"decode phase's time went on {len(prompts)} prompts ({rounds} rounds)")
    print(f"{'K':>3}{'full step ms':>14}{'draft step ms':>15}{'verify ms':>11}{'limit':>7}{'drafting':>10}"
          f"{'verifying':>11}{'the rest':>10}{'accept':>8}")
    for r in rows:
        print(f"{r['K']:>3}{r['full_step_ms']:>14.3f}{r['draft_step_ms']:>15.3f}{r['verify_ms']:>11.3f}"
              f"{r['limit']:>7.2f}{r['share_draft']:>10.0%}{r['share_verify']:>11.0%}{r['share_other']:>10.0%}"
              f"{r['acceptance']:>8.0%}")
    return rows


def bench_batch(model, label: str, prompts, max_new: int, eos, batches: list[int], rounds: int,
                compile: bool = False, draft_layers: int | None = None, num_speculations: int = 8,
                draft_confidence: float = 0.0) -> list[dict]:
    """The same prompts decoded in batches of each size (generate_batch), at full depth and, with draft_layers,
    self-speculatively, eagerly and, with compile, through the compiled graphs too, timed in interleaved rounds:
    tokens/s (answer tokens only, not what a row that has stopped computes meanwhile) against eager batch 1, against
    the same mode's batch 1, and (speculation) against the same batch at full depth, end to end and in the decode
    phase (from a batch's first new token to its last: the prompts' pass, which speculation leaves alone, apart)."""
    def run(b, compiled, K):
        draft = dict(draft_layers=K, num_speculations=num_speculations, draft_confidence=draft_confidence) if K else {}

        def decode():
            outs, phase = [], 0.0
            for s in range(0, len(prompts), b):
                seen = []
                outs += generate_batch(model, prompts[s:s + b], max_new, eos_id=eos, compile=compiled,
                                       on_token=lambda row, t: seen.append(time.perf_counter()), **draft)
                phase += seen[-1] - seen[0] if seen else 0.0
            return outs, phase
        return decode
    configs = {(b, c, K): run(b, c, K) for c in ([False, True] if compile else [False])
               for K in [None] + ([draft_layers] if draft_layers else []) for b in batches}
    with torch.inference_mode():
        outs = {key: fn()[0] for key, fn in configs.items()}  # untimed: the warm-up (compiling), and the answers
        times, phases = {key: [] for key in configs}, {key: [] for key in configs}
        for _ in range(rounds):  # round-robin, so that drift hits all alike
            for key, fn in configs.items():
                t0 = time.perf_counter()
                phase = fn()[1]
                times[key].append(time.perf_counter() - t0)
                phases[key].append(phase)
    seconds = {key: statistics.median(t) for key, t in times.items()}
    decode_s = {key: statistics.median(t) for key, t in phases.items()}
    first = (batches[0], False, None)
    n_tokens = sum(len(o) for o in outs[first])
    print(f"\nbatched decoding: {label}; {len(prompts)} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} "
          f"tokens, {n_tokens} answer tokens in all, greedy, median of {rounds} rounds; speculation drafts with "
          f"{draft_layers} layers, at most {num_speculations} a cycle, confidence {draft_confidence}; x full: against "
          "the same batch and mode at full depth")
    print(f"{'batch':>6}{'mode':>10}{'decoding':>14}{'tok/s':>9}{'x eager 1':>10}{'x same 1':>9}{'x full':>8}"
          f"{'decode x full':>14}{'= eager 1':>10}")
    rows = []
    for b, c, K in configs:
        tps = n_tokens / seconds[b, c, K]
        full = (b, c, None)
        rows.append(dict(batch=b, compiled=c, draft_layers=K, tokens_per_s=round(tps, 1),
                         speedup=round(seconds[first] / seconds[b, c, K], 2),
                         speedup_same_mode=round(seconds[batches[0], c, K] / seconds[b, c, K], 2),
                         speedup_over_full=round(seconds[full] / seconds[b, c, K], 3),
                         decode_speedup_over_full=round(decode_s[full] / decode_s[b, c, K], 3),
                         identical_to_batch_1=outs[b, c, K] == outs[first]))
        r = rows[-1]
        print(f"{b:>6}{'compiled' if c else 'eager':>10}{f'spec K={K}' if K else 'full depth':>14}{tps:>9.1f}"
              f"{r['speedup']:>10.2f}{r['speedup_same_mode']:>9.2f}{r['speedup_over_full']:>8.2f}"
              f"{r['decode_speedup_over_full']:>14.2f}{'yes' if r['identical_to_batch_1'] else 'no':>10}")
    for c in ([False, True] if compile and draft_layers else [False] if draft_layers else []):
        losing = [r["batch"] for r in rows if r["draft_layers"] and r["compiled"] == c
                  and r["decode_speedup_over_full"] < 1]
        verdict = f"stops paying at batch {min(losing)}" if losing else f"pays at every batch size up to {max(batches)}"
        print(f"{'compiled' if c else 'eager'} self-speculation against full depth, decode phase: {verdict}")
    return rows


# --- the train step

def train_step_fn(mode: str, dim: int, seq: int, batch: int):
    """A function running one forward + backward + AdamW step of `mode` on fixed data: sft or sorted (soft.py's
    loss, the one-process default), sorted_fused (scale/fused_ce.py's), hf (transformers)."""
    args = ModelArgs(dim=dim, n_layers=40, n_heads=dim // 64, vocab_size=round(dim * 32000 / 5120),
                     hidden_dim=round(dim * 13824 / 5120 / 8) * 8, max_seq_len=seq)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    labels = torch.roll(tokens, -1, 1)
    labels[:, :int(0.4 * seq)] = -100  # an Alpaca-like prompt share carries no loss
    labels[:, -1] = -100
    positions = (labels.view(-1) != -100).nonzero().squeeze(1)
    targets, n_targets = labels.view(-1)[positions], len(positions)
    model = random_model(args).train()
    if mode == "hf":
        model = hf_model(model).train()

        def loss():
            return model(input_ids=tokens, labels=labels).loss
    else:
        objective = SortedObjective(model) if mode == "sorted_fused" else lambda *b: sorted_loss(model, *b)
        exits = list(range(12, 41, 4)) if mode.startswith("sorted") else [40]

        def loss():
            return objective(tokens, positions, targets, exits, [1.0] * len(exits), 1.0 / n_targets)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in model.parameters())


def train_worker(mode: str, dim: int, seq: int, batch: int):
    """Peak memory of two steps of one mode, in a process of its own (ru_maxrss only grows), above the
    memory the process held before the model was built."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, _ = train_step_fn(mode, dim, seq, batch)
    step()
    step()
    print(json.dumps(dict(peak_mem_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)))


def bench_train(dim: int, seq: int, batch: int, rounds: int) -> list[dict]:
    modes = ("sft", "sorted", "sorted_fused", "hf")
    peak = {}
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--train_worker", mode, "--train_dim", str(dim),
               "--train_seq", str(seq), "--train_batch", str(batch)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise DataError(f"the {mode} memory worker failed: {p.stderr.strip().splitlines()[-1]}")
        peak[mode] = json.loads(p.stdout.strip().splitlines()[-1])["peak_mem_mb"]
    steps = {}
    for mode in modes:  # all three in this process, timed in interleaved rounds
        steps[mode], n_params = train_step_fn(mode, dim, seq, batch)
        steps[mode]()  # builds AdamW's state
    seconds, best = interleaved(steps, rounds)
    print(f"\ntrain step: 40 layers, dim {dim}, vocab {round(dim * 32000 / 5120)} (13B's ratio), {n_params / 1e6:.1f}M "
          f"parameters, batch {batch} x {seq} tokens (40% prompt), float32, forward + backward + AdamW, "
          f"{torch.get_num_threads()} threads; time: median and best of {rounds} interleaved rounds; memory: peak RSS "
          "of a process of its own, above its RSS before the model")
    print(f"{'configuration':<38}{'s/step':>8}{'vs sft':>8}{'best':>8}{'vs sft':>8}{'peak MB':>9}{'vs sft':>8}")
    rows = []
    for mode, label in (("sft", "ours, --mode sft (exit 40)"), ("sorted", "ours, --mode sorted (exits 12..40)"),
                        ("sorted_fused", "ours, sorted, --fused_ce"), ("hf", "transformers LlamaForCausalLM")):
        t, b, m = seconds[mode], best[mode], peak[mode]
        rows.append(dict(name=label, sec_per_step=round(t, 4), time_vs_sft=round(t / seconds["sft"], 3),
                         best_sec_per_step=round(b, 4), best_vs_sft=round(b / best["sft"], 3),
                         peak_mem_mb=round(m, 1), mem_vs_sft=round(m / peak["sft"], 3)))
        print(f"{label:<38}{t:>8.3f}{t / seconds['sft']:>8.2f}{b:>8.3f}{b / best['sft']:>8.2f}"
              f"{m:>9.0f}{m / peak['sft']:>8.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Decoding and train-step benchmarks.")
    p.add_argument("--only", choices=["decode", "batch", "train"], default=None)
    p.add_argument("--ckpt", default=None,
                   help="checkpoint to decode with (default: random weights of the shape below)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n_layers", type=int, default=16)
    p.add_argument("--n_heads", type=int, default=16)
    p.add_argument("--n_kv_heads", type=int, default=None)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--depths", default=None, help="comma-separated (default: the default exits)")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--num_prompts", type=int, default=48, help="prompts timed in each workload (trained checkpoint)")
    p.add_argument("--num_eval", type=int, default=256, help="task prompts whose answers are checked (untimed)")
    p.add_argument("--num_speculations", type=int, default=8, help="most tokens a draft proposes")
    p.add_argument("--draft_confidence", type=float, default=0.5, help="drafts stop below this top probability")
    p.add_argument("--thresholds", default="0.5,0.8,0.9,0.95,0.99", help="early-exit confidence thresholds")
    p.add_argument("--exit_thresholds", default="paper",
                   help="one more early-exit row with a threshold per exit below the last, comma-separated; "
                        "'paper': the paper's 13B thresholds (0.95 0.95 0.9 0.9 0.8 0.8 0.7 at 30..90%% depth) "
                        "at the nearest relative depth; 'none' for no such row")
    p.add_argument("--compile", action="store_true", help="also time compiled full-depth and self-speculative "
                                                          "decoding, compiled batches, and what compiling costs")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of every configuration")
    p.add_argument("--batches", default="1,4,16", help="batch sizes to decode the first (largest) prompts with")
    p.add_argument("--draft_layers", type=int, default=None,
                   help="--only batch: also batched self-speculation drafting with this many layers")
    p.add_argument("--cycles", default=None, metavar="K1,K2,...",
                   help="--only decode: where a self-speculative cycle's time goes, drafting with these depths")
    p.add_argument("--no_hf", action="store_true", help="skip transformers")
    p.add_argument("--train_dim", type=int, default=256)
    p.add_argument("--train_seq", type=int, default=256)
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--plot", default=None, help="draw decoding tokens/s into this PNG (needs matplotlib)")
    a = p.parse_args(argv)
    if a.train_worker:
        return train_worker(a.train_worker, a.train_dim, a.train_seq, a.train_batch)
    report = dict(settings=vars(a))
    try:
        for flag in ("num_prompts", "num_eval", "rounds", "new_tokens", "prompt_len"):
            if getattr(a, flag) < 1:
                raise FlagError(f"--{flag} must be at least 1")
        try:
            thresholds = [float(x) for x in a.thresholds.split(",")]
        except ValueError:
            raise FlagError(f"--thresholds {a.thresholds!r}: expected comma-separated numbers")
        if a.plot:
            import_matplotlib()
        try:
            batches = sorted({int(x) for x in a.batches.split(",")})
        except ValueError:
            raise FlagError(f"--batches {a.batches!r}: expected comma-separated sizes")
        if a.only in (None, "decode", "batch"):
            model = load_model(a.ckpt, dtype=torch.float32) if a.ckpt else random_model(ModelArgs(
                dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                max_seq_len=a.prompt_len + a.new_tokens + 8)).eval()
            n = model.args.n_layers
        if a.only in (None, "batch"):
            B = max(batches)
            prompts, refs, tok, max_new = decode_workload(a.ckpt, model, a.num_eval, a.prompt_len, a.new_tokens,
                                                          n_random=B)
            workloads = {"random weights": prompts[:B]}
            if refs:  # held-out tasks: the mix, and those whose answers are long, where decoding takes the time
                long = [prompts[i] for i in long_answers(refs, tok)]
                workloads = {f"{a.ckpt}, all tasks": prompts[:B], f"{a.ckpt}, long answers": long[:B]}
            report["batch"] = {name: bench_batch(model, name, ps, max_new, tok.eos_id if tok else None, batches,
                                                 a.rounds, a.compile, a.draft_layers, a.num_speculations,
                                                 a.draft_confidence) for name, ps in workloads.items()}
        if a.only in (None, "decode"):
            exits = trained_exits(a.ckpt, n) if a.ckpt else default_exits(n)
            depths = sorted(set(parse_depths(a.depths, n, "--depths") if a.depths else exits) | {n})
            prompts, refs, tok, max_new = decode_workload(a.ckpt, model, a.num_eval, a.prompt_len, a.new_tokens)
            # a random model's exits disagree with its last layer: drafts and early exits have nothing to show
            per_exit = exit_thresholds(a.exit_thresholds, [e for e in exits if e < n], n)
            configs = decode_configs(model, depths, exits, max_new, tok.eos_id if tok else None, a.ckpt is not None,
                                     a.num_speculations, a.draft_confidence, thresholds + per_exit, not a.no_hf,
                                     a.compile)
            report["decode"] = bench_decode(model, a.ckpt or "random weights", configs, prompts, refs, tok, a.rounds,
                                            a.num_prompts)
            if a.cycles:  # on the long answers, where decoding takes the time
                long = [prompts[i] for i in long_answers(refs, tok)] if refs else prompts
                report["cycles"] = [row for c in ([False, True] if a.compile else [False]) for row in bench_cycle(
                    model, long[:a.num_prompts], parse_depths(a.cycles, n - 1, "--cycles"), a.num_speculations,
                    a.draft_confidence, max_new, tok.eos_id if tok else None, c, a.rounds)]
        if a.only in (None, "train"):
            report["train"] = bench_train(a.train_dim, a.train_seq, a.train_batch, a.rounds)
    except (CheckpointError, DataError, FlagError) as e:
        sys.exit(f"error: {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if a.plot and "decode" in report:
        plot(report["decode"], a.plot)


def import_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise FlagError("--plot needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: list[dict], path: str):
    plt = import_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1))
    key = [k for k in rows[0] if k.startswith("tokens_per_s")][-1]
    ax.barh([r["name"] for r in rows][::-1], [r[key] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel(f"{key.replace('_', ' ')}, batch 1, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
