"""Associative recall with routing on: the runs of docs/learning.md §4 (an experiment record).

A plain AdamW loop (warmup, then constant; clip 1.0) over the demo's gin model, with the
token-level task built here in numpy: filler ids, facts `MARK key value` (or, with
--single, one token per fact carrying key and value), the question `QMARK key` at the end.
Reports, per encoder layer, the k/v routers' recall of fact tokens (`kv_recall`) and of the
answer's fact (`kv_answer`), and how often the query router takes the question's key
(`q_question`), at the training length and at --eval_lengths. Run from the project root:

  .venv/bin/python docs/learning/recall_routing.py --single --nkey 16 --nval 8 \
    --stage_bind '64:ROUTED_FRACTION = 1.0' --stage_bind '64:ROUTED_KV_RATIO = 1.0' \
    --stage_bind '128:routing.RoutingCapacity.train_capacity_factor = 16.0' \
    --lengths 64:1500 --batches 64:32 --length 128 --batch 16 --steps 2700 \
    --eval_every 300 --eval_n 128 --eval_lengths 2048        # run e7

--stage_bind 'L:binding' applies a gin binding while the input length is L (the modules
read gin when traced). The demo (colt5_flax/demo.py) is the project's version of what
these runs found; its task is colt5_flax/data/recall.py.
"""
import argparse, json, sys, time
import numpy as np
sys.path.insert(0, ".")
import flax.linen as nn, jax, jax.numpy as jnp, optax
from colt5_flax import gin_utils
from colt5_flax.count_params import model_from_gin

p = argparse.ArgumentParser()
p.add_argument("--files", default="models/colt5_tiny.gin,runs/demo.gin")
p.add_argument("--length", type=int, default=2048)
p.add_argument("--lengths", default="", help="'128:300,512:600' then --length")
p.add_argument("--batches", default="", help="batch per length '128:32,512:8'")
p.add_argument("--facts", type=int, default=4)
p.add_argument("--facts_by_length", default="", help="facts per length '64:4,128:16'")
p.add_argument("--steps", type=int, default=400)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--nkey", type=int, default=26)
p.add_argument("--nval", type=int, default=10)
p.add_argument("--nfill", type=int, default=27)
p.add_argument("--eval_every", type=int, default=100)
p.add_argument("--eval_lengths", default="")
p.add_argument("--eval_n", type=int, default=64)
p.add_argument("--bind", action="append", default=[])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--single", action="store_true", help="one token per fact: id(key, value)")
p.add_argument("--stage_bind", action="append", default=[], help="'128:ROUTED_FRACTION = 0.25'")
p.add_argument("--out", default=None)
args = p.parse_args()

FILL0 = 2; KEY0 = FILL0 + args.nfill; VAL0 = KEY0 + args.nkey
MARK = VAL0 + args.nval; QMARK = MARK + 1
FACT0 = QMARK + 1  # single: fact id = FACT0 + key * nval + value
lcur = [tuple(map(int, x.split(":"))) for x in args.lengths.split(",") if x]
bsz = dict(tuple(map(int, x.split(":"))) for x in args.batches.split(",") if x)
facts_at = dict(tuple(map(int, x.split(":"))) for x in args.facts_by_length.split(",") if x)
def length_at(s):
  for n, u in lcur:
    if s <= u: return n
  return args.length

def make_batch(rng, n, L, nf=None):
  nf = nf or facts_at.get(L, args.facts)
  enc = rng.integers(FILL0, FILL0 + args.nfill, size=(n, L)).astype(np.int32)
  fm = np.zeros((n, L), np.int32); am = np.zeros((n, L), np.int32); qpos = np.zeros(n, np.int32)
  tgt = np.zeros((n, 2), np.int32)
  for b in range(n):
    keys = rng.choice(args.nkey, nf, replace=False) + KEY0
    vals = rng.integers(0, args.nval, nf) + VAL0
    slots = rng.choice((L // 2) // 3, nf, replace=False) * 3
    for s, k, v in zip(slots, keys, vals):
      if args.single:
        enc[b, s] = FACT0 + (k - KEY0) * args.nval + (v - VAL0); fm[b, s] = 1
      else:
        enc[b, s:s+3] = (MARK, k, v); fm[b, s:s+3] = 1
    q = rng.integers(nf); am[b, slots[q]:slots[q]+(1 if args.single else 3)] = 1
    enc[b, L-3:L] = (QMARK, keys[q], 1); qpos[b] = L - 2
    tgt[b] = (vals[q], 1)
  dec = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :1]], 1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt}, fm, am, qpos

import gin
binds = ["VOCAB_SIZE = 384", "DROPOUT_RATE = 0.0", "MODEL_DIR = 'unused'"] + args.bind
stage_binds = {}
for sb in args.stage_bind:
  l, _, b = sb.partition(":"); stage_binds.setdefault(int(l), []).append(b)
def build(extra):
  gin.clear_config()
  gin_utils.parse_gin_flags(["configs"], args.files.split(","), binds + extra, finalize_config=False)
  return model_from_gin()
model = build([])
_configured = [None]
def model_for(L):
  # Nested modules read gin at trace time: parse this length's stage bindings first.
  want = tuple(stage_binds.get(L, []))
  if _configured[0] != want:
    build(list(want)); _configured[0] = want
  return model
shapes = {"encoder_input_tokens": (1, 128), "decoder_input_tokens": (1, 2), "decoder_target_tokens": (1, 2)}
params = nn.unbox(model.get_initial_variables(jax.random.PRNGKey(args.seed), shapes)["params"])
nparams = sum(x.size for x in jax.tree_util.tree_leaves(params))
sched = optax.join_schedules([optax.linear_schedule(0.0, args.lr, args.warmup), optax.constant_schedule(args.lr)], [args.warmup])
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
opt_state = opt.init(params)

import functools
@functools.partial(jax.jit, static_argnums=4)
def train_step(params, opt_state, b, rng, L):
  (loss, m), g = jax.value_and_grad(model_for(L).loss_fn, has_aux=True)(params, b, rng)
  u, opt_state = opt.update(g, opt_state, params)
  return optax.apply_updates(params, u), opt_state, m["cross_ent_loss"]

@functools.partial(jax.jit, static_argnums=2)
def predict(params, b, L):
  logits, state = model_for(L).module.apply({"params": params}, b["encoder_input_tokens"], b["decoder_input_tokens"],
      b["decoder_target_tokens"], enable_dropout=False, mutable=["intermediates"])
  return jnp.argmax(logits, -1), state.get("intermediates", {})

def routed(inter, name):
  enc = inter.get("encoder", {})
  if "layers" in enc:
    s = enc["layers"]["layer"]["attention"].get(name)
    return [] if s is None else list(np.asarray(s[0]))
  names = sorted((n for n in enc if n.startswith("layers_")), key=lambda n: int(n[7:]))
  out = []
  for n in names:
    s = enc[n].get("attention", {}).get(name)
    if s is not None: out.append(np.asarray(s[0]))
  return out

def recall(idx, mask):
  sel = np.zeros_like(mask); np.put_along_axis(sel, idx, 1, axis=1)
  return float(((sel * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean())

evals = {}
def evaluate(params, L):
  if L not in evals:
    erng = np.random.default_rng(12345 + L)
    evals[L] = [make_batch(erng, 32, L) for _ in range(max(1, args.eval_n // 32))]
  em, kvr, kva, qr = [], [], [], []
  for b, fm, am, qpos in evals[L]:
    model_for(L); pred, inter = predict(params, b, L)
    em.append(np.all(np.asarray(pred) == b["decoder_target_tokens"], 1).mean())
    kv = routed(inter, "kv_routed_indices"); q = routed(inter, "q_routed_indices")
    if kv:
      kvr.append([recall(x, fm) for x in kv]); kva.append([recall(x, am) for x in kv])
      qm = np.zeros_like(fm); qm[np.arange(len(qpos)), qpos] = 1
      qr.append([recall(x, qm) for x in q])
  r = {"em": round(float(np.mean(em)), 3)}
  if kvr:
    r["kv_recall"] = [round(x, 3) for x in np.mean(kvr, 0)]
    r["kv_answer"] = [round(x, 3) for x in np.mean(kva, 0)]
    r["q_question"] = [round(x, 3) for x in np.mean(qr, 0)]
  return r

print(json.dumps({"args": vars(args), "params": int(nparams)}), flush=True)
rng = np.random.default_rng(args.seed); key = jax.random.PRNGKey(args.seed + 1)
t0 = time.time(); losses = []; hist = []; train_s = 0.0
eval_lengths = [int(x) for x in args.eval_lengths.split(",") if x] or [args.length]
for step in range(1, args.steps + 1):
  L = length_at(step)
  b, *_ = make_batch(rng, bsz.get(L, args.batch), L)
  key, sub = jax.random.split(key)
  ts = time.time()
  model_for(L); params, opt_state, loss = train_step(params, opt_state, b, sub, L)
  losses.append(float(loss)); train_s += time.time() - ts
  if step % args.eval_every == 0 or step == args.steps:
    r = {"step": step, "L": L, "loss": round(float(np.mean(losses[-25:])), 3), "train_s": round(train_s, 1), "wall": round(time.time() - t0, 1)}
    for el in sorted(set(eval_lengths + [L])):
      r[f"@{el}"] = evaluate(params, el)
    hist.append(r); print("EVAL", json.dumps(r), flush=True)
if args.out:
  json.dump({"args": vars(args), "params": int(nparams), "history": hist}, open(args.out, "w"), indent=1)
