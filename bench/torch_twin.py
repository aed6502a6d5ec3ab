#!/usr/bin/env python3
"""A PyTorch twin of the baseline in train/src/main.rs, for measurement only.

Same architecture, initialisation (the same seeded SplitMix64 draws), optimizer (Muon with
polar express, NorMuon and cautious weight decay; AdamW), hyperparameters, schedules, budget
clock, data (the prepared token shards, packed by a re-implementation of prepare's loader) and
evaluator (checked against the manifest's digest of the validation targets). It prints the same
step lines and summary block as the train binary, and writes the same JSON report.

What differs on purpose is only how the work is done: attention through PyTorch's fused
scaled_dot_product_attention, and torch.compile where it helps (`--compile`, on by default on
CUDA). Keep it in step with train/src/main.rs: `bench/side_by_side.py check` proves the two
agree before any speed is compared.

    AUTORESEARCH_CACHE=... python bench/torch_twin.py [--device cpu|cuda] [--budget S]
"""

import argparse
import bisect
import hashlib
import json
import math
import os
import queue
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Hyperparameters: train/src/main.rs's H100 and TINY blocks.
# ---------------------------------------------------------------------------------------------

H100 = dict(
    depth=8,
    aspect_ratio=64,
    head_dim=128,
    window_pattern="SSSL",
    total_batch_size=1 << 19,
    device_batch_size=64,
    embedding_lr=0.6,
    unembedding_lr=0.004,
    matrix_lr=0.04,
    scalar_lr=0.5,
    weight_decay=0.2,
    adam_betas=(0.8, 0.95),
    warmup_ratio=0.0,
    warmdown_ratio=0.5,
    final_lr_frac=0.0,
)
TINY = dict(H100, depth=4, aspect_ratio=32, head_dim=32, total_batch_size=8 * 256, device_batch_size=8)

SOFTCAP = float(os.environ.get("TWIN_PERTURB_SOFTCAP", "15.0"))  # a wrong twin, for the test that the check catches one
VE_GATE_CHANNELS = 32
ROPE_BASE = 10_000.0
NORM_EPS = 1e-6
H100_BF16_PEAK_FLOPS = 989.5e12
WARMUP_STEPS = 10  # prepare::clock::WARMUP_STEPS: steps the budget clock does not count
DOC_BUFFER = 1000  # prepare::loader::DOC_BUFFER
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# ---------------------------------------------------------------------------------------------
# prepare's SplitMix64, bit for bit: it draws both the loader's shuffles and the initial weights.
# ---------------------------------------------------------------------------------------------

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix(z):
    """SplitMix64's output function over a numpy uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Rng:
    def __init__(self, seed):
        self.state = seed & M64

    def draws(self, n):
        """The next n outputs as uint64: the generator is a counter, so they vectorise."""
        steps = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN)
        out = _mix(steps + np.uint64(self.state))
        self.state = (self.state + n * GOLDEN) & M64
        return out

    def below(self, n):
        return (int(self.draws(1)[0]) * n) >> 64

    def shuffle(self, items):
        n = len(items)
        draws = self.draws(max(n - 1, 0)).tolist()
        for d, i in zip(draws, range(n - 1, 0, -1)):
            j = (d * (i + 1)) >> 64
            items[i], items[j] = items[j], items[i]

    def uniform01(self, n):
        return (self.draws(n) >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)

    def normal(self, n):
        # Box-Muller in f32, u1 then u2 per value, as train's `normal`.
        u = self.uniform01(2 * n).reshape(n, 2)
        u1 = np.maximum(u[:, 0], np.float32(1e-7))
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        return r * np.cos(np.float32(2 * math.pi) * u[:, 1])


# ---------------------------------------------------------------------------------------------
# Prepared data: manifest, ARTOK001 token shards, the packing loader, the evaluator.
# ---------------------------------------------------------------------------------------------


class Shard:
    def __init__(self, path):
        raw = open(path, "rb").read()
        if raw[:8] != b"ARTOK001":
            sys.exit(f"{path}: not a token shard; run `autoresearch prepare --force`")
        n_docs, n_tokens = np.frombuffer(raw[8:24], dtype="<u8")
        self.offsets = np.frombuffer(raw, dtype="<u8", count=int(n_docs) + 1, offset=24).astype(np.int64)
        self.tokens = np.frombuffer(raw, dtype="<u2", offset=24 + 8 * (int(n_docs) + 1))
        assert len(self.tokens) == n_tokens, f"{path}: truncated"

    def __len__(self):
        return len(self.offsets) - 1

    def doc(self, i):
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


class Dataset:
    def __init__(self, cache):
        path = os.path.join(cache, "manifest.json")
        if not os.path.exists(path):
            sys.exit(f"no prepared data in {cache}: run `autoresearch prepare` first")
        self.cache = cache
        self.manifest = json.load(open(path))
        self.preset = self.manifest["preset"]
        self.vocab = self.preset["vocab_size"]
        self.seq_len = self.preset["seq_len"]
        self.bos = self.manifest["tokenizer"]["bos_id"]
        tb = os.path.join(cache, self.manifest["tokenizer"]["token_bytes_file"])
        self.token_bytes = np.fromfile(tb, dtype="<u4")

    def shards(self, split):
        return [os.path.join(self.cache, s["file"]) for s in self.manifest[split]]


class Loader:
    """prepare::loader::Loader: BOS-aligned rows, best-fit packing, per-shard shuffles by seed."""

    def __init__(self, paths, bos, rows, seq_len, seed):
        self.paths, self.bos, self.rows, self.seq_len, self.seed = paths, bos, rows, seq_len, seed
        self.epoch, self.shard_idx, self.shard, self.order, self.pos = 1, 0, None, [], 0
        self.keys, self.docs, self.arrivals = [], {}, 0  # keys: sorted (length with BOS, arrival)

    def _next_doc(self):
        while True:
            if self.shard is not None and self.pos < len(self.order):
                self.pos += 1
                return self.shard, self.order[self.pos - 1]
            if self.shard is not None:
                self.shard_idx += 1
                if self.shard_idx == len(self.paths):
                    self.shard_idx, self.epoch = 0, self.epoch + 1
            if not (len(self.paths) == 1 and self.shard is not None):
                self.shard = Shard(self.paths[self.shard_idx])
            self.order = list(range(len(self.shard)))
            if self.seed is not None:
                mix = (
                    self.seed
                    ^ ((self.epoch * 0xA24BAED4963EE407) & M64)
                    ^ ((self.shard_idx * 0x9FB21C651E98DF25) & M64)
                )
                Rng(mix).shuffle(self.order)
            self.pos = 0

    def _fill_row(self, row):
        pos, capacity = 0, len(row)
        while pos < capacity:
            while len(self.keys) < DOC_BUFFER:
                shard, i = self._next_doc()
                key = (int(shard.offsets[i + 1] - shard.offsets[i]) + 1, self.arrivals)
                bisect.insort(self.keys, key)
                self.docs[key] = (shard, i)
                self.arrivals += 1
            remaining = capacity - pos
            at = bisect.bisect_right(self.keys, (remaining, M64)) - 1
            if at >= 0:  # the largest length that fits, its earliest arrival
                at = bisect.bisect_left(self.keys, (self.keys[at][0], -1))
            else:  # nothing fits: crop the shortest
                at = 0
            key = self.keys.pop(at)
            shard, i = self.docs.pop(key)
            take = min(key[0], remaining)
            row[pos] = self.bos
            row[pos + 1 : pos + take] = shard.doc(i)[: take - 1]
            pos += take

    def next_rows(self, rows):
        out = np.empty((rows, self.seq_len + 1), dtype=np.int64)
        for r in range(rows):
            self._fill_row(out[r])
        return out[:, :-1], out[:, 1:]

    def prefetch(self, depth=4):
        """Packs on a background thread; returns the function that takes the next batch."""
        q = queue.Queue(depth)

        def work():
            try:
                while True:
                    q.put(self.next_rows(self.rows))
            except BaseException as e:  # the training loop re-raises it instead of waiting forever
                q.put(e)

        threading.Thread(target=work, daemon=True).start()

        def next_batch():
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            return item

        return next_batch


def evaluate_bpb(data, loss_fn, batch_size, device):
    """prepare::evaluate_bpb: the first eval rows of validation, Σ nats / (ln 2 · Σ bytes)."""
    loader = Loader(data.shards("val"), data.bos, batch_size, data.seq_len, None)
    rows_left = -(-data.preset["eval_tokens"] // data.seq_len)
    digest, count, nats, nbytes = hashlib.sha256(), 0, 0.0, 0
    token_bytes = torch.from_numpy(data.token_bytes.astype(np.int64)).to(device)
    with torch.no_grad():
        while rows_left:
            rows = min(rows_left, batch_size)
            rows_left -= rows
            x, y = loader.next_rows(rows)
            digest.update(y.astype("<u4").tobytes())
            count += y.size
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            loss = loss_fn(x, y).float()
            b = token_bytes[y]
            nats += loss[b > 0].double().sum().item()
            nbytes += b.sum().item()
    expected = data.manifest["eval"]
    if count != expected["tokens"] or digest.hexdigest() != expected["digest"]:
        sys.exit("the twin's evaluation rows differ from the manifest's: its loader is no twin")
    return nats / (math.log(2) * nbytes), {"tokens": count, "digest": digest.hexdigest()}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def norm(x):
    """RMSNorm without weights, in f32."""
    dtype = x.dtype
    x = x.float()
    return (x / torch.sqrt(x.square().mean(-1, keepdim=True) + NORM_EPS)).to(dtype)


class Gpt(torch.nn.Module):
    def __init__(self, hp, vocab, seq_len, seed, device, compute):
        super().__init__()
        dim = -(-hp["depth"] * hp["aspect_ratio"] // hp["head_dim"]) * hp["head_dim"]
        pattern = hp["window_pattern"].upper()
        windows = [seq_len // 2 if pattern[i % len(pattern)] == "S" else seq_len for i in range(hp["depth"])]
        windows[-1] = seq_len
        self.vocab, self.seq_len, self.dim, self.windows = vocab, seq_len, dim, windows
        self.n_layer, self.head_dim, self.n_head = hp["depth"], hp["head_dim"], dim // hp["head_dim"]
        self.compute = compute
        rng = Rng(seed)
        p = lambda a, shape: torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(shape)).to(device))
        normal = lambda shape, std: p(rng.normal(shape[0] * shape[1]) * np.float32(std), shape)
        uniform = lambda shape, bound: p((rng.uniform01(shape[0] * shape[1]) * np.float32(2) - np.float32(1)) * np.float32(bound), shape)
        const = lambda shape, value: p(np.full(shape, value, dtype=np.float32), shape)
        s = np.float32(np.sqrt(np.float32(3))) / np.float32(np.sqrt(np.float32(dim)))
        kv = self.n_head * self.head_dim
        # Draw order is train's Gpt::new: wte, then per layer q, k, v, fc, value embedding; lm_head.
        self.wte = normal((vocab, dim), 1.0)
        self.blocks = torch.nn.ModuleList()
        for layer in range(self.n_layer):
            b = torch.nn.Module()
            b.c_q, b.c_k, b.c_v = uniform((kv, dim), s), uniform((kv, dim), s), uniform((kv, dim), s)
            b.c_proj = const((dim, kv), 0.0)
            b.c_fc = uniform((4 * dim, dim), s)
            b.mlp_proj = const((dim, 4 * dim), 0.0)
            b.has_ve = layer % 2 == (self.n_layer - 1) % 2
            if b.has_ve:
                b.ve_gate = const((self.n_head, VE_GATE_CHANNELS), 0.0)
                b.value_embed = uniform((vocab, kv), s)
            self.blocks.append(b)
        self.lm_head = normal((vocab, dim), 0.001)
        self.resid_lambdas = const((1, self.n_layer), 1.0)
        self.x0_lambdas = const((1, self.n_layer), 0.1)
        half = self.head_dim // 2
        inv = 1.0 / ROPE_BASE ** (np.arange(half, dtype=np.float64) * 2 / self.head_dim)
        angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv[None, :]
        table = lambda f: torch.from_numpy(f(angles).astype(np.float32)).to(device, compute).view(1, seq_len, 1, half)
        self.register_buffer("cos", table(np.cos), persistent=False)
        self.register_buffer("sin", table(np.sin), persistent=False)
        i = torch.arange(seq_len, device=device)
        for w in set(windows):
            # Query i sees key j when j <= i and i - j <= w; None = plain causal (every key before).
            see = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= w)
            self.register_buffer(f"mask_{w}", None if w >= seq_len - 1 else see, persistent=False)

    def linear(self, x, w):
        return x @ w.to(self.compute).t()

    def rotary(self, x, t):
        half = self.head_dim // 2
        cos, sin = self.cos[:, :t], self.sin[:, :t]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)

    def attention(self, block, x, ve, layer):
        b, t, _ = x.shape
        h, hd = self.n_head, self.head_dim
        q = self.linear(x, block.c_q).view(b, t, h, hd)
        k = self.linear(x, block.c_k).view(b, t, h, hd)
        v = self.linear(x, block.c_v).view(b, t, h, hd)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.linear(x[..., :VE_GATE_CHANNELS], block.ve_gate))
            v = v + ve.view(b, t, h, hd) * gate.unsqueeze(3)
        q, k = norm(self.rotary(q, t)), norm(self.rotary(k, t))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        mask = getattr(self, f"mask_{self.windows[layer]}")
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:t, :t])
        return self.linear(y.transpose(1, 2).reshape(b, t, h * hd), block.c_proj)

    def forward(self, idx, targets):
        """Cross-entropy of every target, [B, T] f32."""
        x = norm(F.embedding(idx, self.wte).to(self.compute))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = x * self.resid_lambdas[0, i].to(self.compute) + x0 * self.x0_lambdas[0, i].to(self.compute)
            ve = F.embedding(idx, block.value_embed).to(self.compute) if block.has_ve else None
            x = x + self.attention(block, norm(x), ve, i)
            x = x + self.linear(torch.relu(self.linear(norm(x), block.c_fc)).square(), block.mlp_proj)
        logits = self.linear(norm(x), self.lm_head).float()
        logits = torch.tanh(logits / SOFTCAP) * SOFTCAP
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    def groups(self):
        """(name, param, group) in train's `Gpt::params` order."""
        out = [("wte", self.wte, "embedding"), ("lm_head", self.lm_head, "unembedding"),
               ("resid_lambdas", self.resid_lambdas, "resid"), ("x0_lambdas", self.x0_lambdas, "x0")]
        for i, b in enumerate(self.blocks):
            for name in ("c_q", "c_k", "c_v", "c_proj", "c_fc", "mlp_proj"):
                out.append((f"h.{i}.{name}", getattr(b, name), "matrix"))
            if b.has_ve:
                out.append((f"h.{i}.ve_gate", b.ve_gate, "matrix"))
                out.append((f"value_embeds.{i}", b.value_embed, "embedding"))
        return out

    def flops_per_token(self):
        excluded = sum(p.numel() for _, p, g in self.groups() if g in ("embedding", "resid", "x0"))
        attn = sum(12 * self.n_head * self.head_dim * min(w, self.seq_len) for w in self.windows)
        return 6 * (self.num_params() - excluded) + attn

    def num_params(self):
        return sum(p.numel() for _, p, _ in self.groups())


# ---------------------------------------------------------------------------------------------
# Optimizer: Muon for block matrices (stacked by shape), AdamW for the rest
# ---------------------------------------------------------------------------------------------


def polar_express(g):
    x = (g / (g.square().sum((1, 2), keepdim=True).sqrt() * 1.02 + 1e-6)).to(
        torch.bfloat16 if g.is_cuda else torch.float32
    )
    tall = g.shape[1] > g.shape[2]
    for a, b, c in POLAR_EXPRESS:
        if tall:
            m = x.transpose(1, 2) @ x
            x = a * x + x @ (b * m + c * (m @ m))
        else:
            m = x @ x.transpose(1, 2)
            x = a * x + (b * m + c * (m @ m)) @ x
    return x.float()


def normuon(g, second, red_dim, beta2=0.95):
    red_size = g.shape[red_dim]
    v_mean = g.square().mean(red_dim, keepdim=True)
    v_norm = (v_mean.sum((1, 2), keepdim=True) * red_size).sqrt()
    second.mul_(beta2).add_(v_mean, alpha=1 - beta2)
    step_size = second.clamp(min=1e-10).rsqrt()
    v_norm_new = (v_mean * red_size * step_size.square()).sum((1, 2), keepdim=True).sqrt().clamp(min=1e-10)
    return g * (step_size * (v_norm / v_norm_new))


def muon_update(p, g, momentum, second, mu, one_minus_mu, lr, lr_wd, red_dim):
    """The scalars are 0-d tensors: as Python floats, each new value would recompile it."""
    momentum.mul_(mu).add_(g * one_minus_mu)  # Nesterov momentum
    g = normuon(polar_express(g * one_minus_mu + momentum * mu), second, red_dim)
    agree = (g * p >= 0).float()  # cautious weight decay: only where update and weight agree
    return p - g * lr - p * agree * lr_wd


class MuonAdamW:
    def __init__(self, model, hp, compile_fns):
        scale = (model.dim / 768) ** -0.5
        self.adam, shapes = [], {}
        for _, p, group in model.groups():
            if group == "matrix":
                shapes.setdefault(tuple(p.shape), []).append(p)
                continue
            lr, betas = {
                "embedding": (hp["embedding_lr"] * scale, hp["adam_betas"]),
                "unembedding": (hp["unembedding_lr"] * scale, hp["adam_betas"]),
                "resid": (hp["scalar_lr"] * 0.01, hp["adam_betas"]),
                "x0": (hp["scalar_lr"], (0.96, 0.95)),
            }[group]
            self.adam.append([p, lr, betas, torch.zeros_like(p), torch.zeros_like(p), 0, group in ("resid", "x0")])
        self.muon = []
        for (rows, cols), params in sorted(shapes.items()):
            n, dev = len(params), params[0].device
            second, red = ((n, rows, 1), 2) if rows >= cols else ((n, 1, cols), 1)
            self.muon.append((params, torch.zeros((n, rows, cols), device=dev),
                              torch.zeros(second, device=dev), red, max(1.0, rows / cols) ** 0.5))
        self.matrix_lr, self.step_count = hp["matrix_lr"], 0
        self.update = torch.compile(muon_update, dynamic=False) if compile_fns else muon_update

    @torch.no_grad()
    def step(self, lr_multiplier, momentum, weight_decay):
        self.step_count += 1
        for state in self.adam:
            p, lr, (b1, b2), m, v, steps, skip_first = state
            if skip_first and self.step_count == 1:
                continue  # the lambdas' first gradient is rounding noise: see train's MuonAdamW::step
            state[5] = steps = steps + 1
            g = p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).add_(g.square(), alpha=1 - b2)
            denom = (v / (1 - b2**steps)).sqrt() + 1e-10
            p.sub_(m / denom * (lr * lr_multiplier / (1 - b1**steps)))
        for params, mom, second, red, lr_scale in self.muon:
            g = torch.stack([p.grad for p in params])
            p = torch.stack([p.data for p in params])
            lr = self.matrix_lr * lr_scale * lr_multiplier
            # Each scalar is rounded to f32 from its f64 value, as candle does with train's.
            f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=p.device)
            new = self.update(p, g, mom, second, f32(momentum), f32(1 - momentum), f32(lr),
                              f32(lr * weight_decay), red)
            for i, param in enumerate(params):
                param.copy_(new[i])
        for p, *_ in self.adam:
            p.grad = None
        for params, *_ in self.muon:
            for p in params:
                p.grad = None


def lr_multiplier(hp, progress):
    if progress < hp["warmup_ratio"]:
        return progress / hp["warmup_ratio"]
    if progress < 1 - hp["warmdown_ratio"]:
        return 1.0
    cooldown = (1 - progress) / hp["warmdown_ratio"]
    return cooldown + (1 - cooldown) * hp["final_lr_frac"]


def muon_momentum(step):
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class BudgetClock:
    """prepare::clock::BudgetClock: counts step time after the first WARMUP_STEPS steps."""

    def __init__(self, budget):
        self.budget, self.steps, self.trained = budget, 0, 0.0

    def progress(self):
        return 1.0 if self.budget <= 0 else min(self.trained / self.budget, 1.0)

    def exhausted(self):
        return self.steps > WARMUP_STEPS and self.trained >= self.budget

    def end_step(self, dt):
        if self.steps > WARMUP_STEPS:
            self.trained += dt
        self.steps += 1


PHASES = ["data", "forward", "backward", "optimizer"]


TIME_PHASES_EVERY = 10  # train's: timing every step (a sync per lap) would slow every step


class Stopwatch:
    """train's Stopwatch: where a step's time goes, the device synchronised at every lap."""

    def __init__(self, device):
        self.device, self.step, self.timing = device, [0.0] * 4, True

    def restart(self, timing):
        self.last, self.step, self.timing = time.perf_counter(), [0.0] * 4, timing

    def lap(self, phase):
        if not self.timing:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.step[PHASES.index(phase)] += now - self.last
        self.last = now


def driver_used_mb(device):
    if device.type != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def main():
    start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.environ.get("AUTORESEARCH_CACHE", os.path.expanduser("~/.cache/autoresearch")))
    ap.add_argument("--device", default=os.environ.get("AUTORESEARCH_DEVICE", "cpu"), choices=["cpu", "cuda"])
    ap.add_argument("--budget", type=float, default=os.environ.get("AUTORESEARCH_TIME_BUDGET"))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("AUTORESEARCH_SEED", "42")))
    ap.add_argument("--device-batch", type=int, help="rows per pass (same optimizer steps; memory and speed only)")
    ap.add_argument("--compile", choices=["on", "off"], help="torch.compile the model and the Muon update (default: on for cuda)")
    ap.add_argument("--report", default=os.environ.get("AUTORESEARCH_REPORT"))
    args = ap.parse_args()

    data = Dataset(args.cache)
    hp = {"h100": H100, "tiny": TINY}[data.preset["name"]]
    if args.device_batch:
        hp = dict(hp, device_batch_size=args.device_batch)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: this PyTorch sees no GPU (torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    use_compile = (args.compile or ("on" if device.type == "cuda" else "off")) == "on"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budget = args.budget if args.budget is not None else data.preset["time_budget_s"]
    seq = data.seq_len
    model = Gpt(hp, data.vocab, seq, args.seed, device, compute)
    loss_fn = torch.compile(model, dynamic=False) if use_compile else model
    tokens_per_pass = hp["device_batch_size"] * seq
    assert hp["total_batch_size"] % tokens_per_pass == 0, "TOTAL_BATCH_SIZE must be a multiple of a pass"
    accum = hp["total_batch_size"] // tokens_per_pass
    flops = model.flops_per_token()
    print(f"twin: torch {torch.__version__}, {device}, compile {'on' if use_compile else 'off'}, "
          f"threads {torch.get_num_threads()}")
    print(f"model: depth {model.n_layer}, dim {model.dim}, heads {model.n_head}×{model.head_dim}, "
          f"windows {model.windows}, {model.num_params() / 1e6:.2f}M parameters, {flops:.3e} FLOPs/token")
    print(f"batch: {hp['total_batch_size']} tokens/step = {accum} × {hp['device_batch_size']} rows × {seq} tokens; "
          f"budget {budget:.0f}s", flush=True)
    opt = MuonAdamW(model, hp, use_compile)
    next_batch = Loader(data.shards("train"), data.bos, hp["device_batch_size"], seq, args.seed).prefetch(4)
    clock = BudgetClock(budget)
    smooth, last_print, peak_mb = 0.0, 0.0, 0.0
    watch, timed_phases, timed_steps = Stopwatch(device), [0.0] * 4, 0
    # prepare::Stopwatch's AUTORESEARCH_PROFILE_STEP: the one step a profiler started with
    # `--profile-from-start off` records (run.sh profile --side twin); the run ends after it.
    profile_step = int(os.environ.get("AUTORESEARCH_PROFILE_STEP", "-1"))
    while not clock.exhausted():
        if clock.steps == profile_step and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        t0 = time.perf_counter()
        watch.restart(clock.steps % TIME_PHASES_EVERY == 0)
        progress = clock.progress()
        lrm = lr_multiplier(hp, progress)
        total = 0.0
        for _ in range(accum):
            x, y = next_batch()
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            watch.lap("data")
            loss = loss_fn(x, y).mean() / accum
            watch.lap("forward")
            loss.backward()
            total += loss.item()
            watch.lap("backward")
        if not math.isfinite(total) or total > 100:
            print(f"FAIL: loss {total} at step {clock.steps}")
            sys.exit(1)
        opt.step(lrm, muon_momentum(clock.steps), hp["weight_decay"] * (1 - progress))
        watch.lap("optimizer")
        if device.type == "cuda":
            torch.cuda.synchronize()
        if watch.timing and clock.steps > WARMUP_STEPS:
            timed_steps += 1
            timed_phases = [a + b for a, b in zip(timed_phases, watch.step)]
        dt = time.perf_counter() - t0
        if clock.steps == profile_step:
            if device.type == "cuda":
                torch.cuda.profiler.stop()
            print(f"profiled step {profile_step} (AUTORESEARCH_PROFILE_STEP): the run ends here, before evaluation",
                  file=sys.stderr)
            sys.exit(0)
        clock.end_step(dt)
        peak_mb = max(peak_mb, driver_used_mb(device))
        smooth = 0.9 * smooth + 0.1 * total
        # Every warm-up step is printed: `side_by_side.py check` reads them back.
        if clock.steps <= WARMUP_STEPS + 1 or time.time() - last_print >= 1 or clock.exhausted():
            last_print = time.time()
            tok_s = hp["total_batch_size"] / dt
            mfu = 100 * flops * tok_s / H100_BF16_PEAK_FLOPS if device.type == "cuda" else 0.0
            print(f"step {clock.steps - 1:05d} ({100 * progress:.1f}%) | loss: {smooth / (1 - 0.9**clock.steps):.6f} "
                  f"| lrm: {lrm:.2f} | dt: {dt * 1e3:.0f}ms | tok/sec: {tok_s:.0f} | mfu: {mfu:.1f}% "
                  f"| remaining: {max(budget - clock.trained, 0):.0f}s", flush=True)

    print(f"time per step (ms, {timed_steps} timed steps): "
          + " | ".join(f"{name} {1e3 * t / max(timed_steps, 1):.1f}" for name, t in zip(PHASES, timed_phases)))
    model.eval()
    val_bpb, spec = evaluate_bpb(data, loss_fn, hp["device_batch_size"], device)
    counted = max(clock.steps - (WARMUP_STEPS + 1), 0)
    mfu = (100 * flops * counted * hp["total_batch_size"] / clock.trained / H100_BF16_PEAK_FLOPS
           if device.type == "cuda" and clock.trained > 0 else 0.0)
    summary = {
        "val_bpb": val_bpb,
        "training_seconds": clock.trained,
        "total_seconds": time.time() - start,
        "peak_vram_mb": peak_mb,
        "mfu_percent": mfu,
        "total_tokens_M": clock.steps * hp["total_batch_size"] / 1e6,
        "num_steps": clock.steps,
        "num_params_M": model.num_params() / 1e6,
        "depth": model.n_layer,
    }
    print("---")
    for key, fmt in [("val_bpb", ".6f"), ("training_seconds", ".1f"), ("total_seconds", ".1f"),
                     ("peak_vram_mb", ".1f"), ("mfu_percent", ".2f"), ("total_tokens_M", ".1f"),
                     ("num_steps", "d"), ("num_params_M", ".1f"), ("depth", "d")]:
        print(f"{key + ':':<18}{summary[key]:{fmt}}")
    if args.report:
        report = dict(summary, eval=spec, preset=data.preset["name"], device=device.type)
        json.dump(report, open(args.report, "w"), indent=2)


if __name__ == "__main__":
    main()
