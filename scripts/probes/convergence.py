"""Train-loss progress of a recipe variant, single process, on the prepared default data (repo root,
after `make run`): how fast a recipe leaves the CTC all-blank plateau.
    FB=2000 .venv/bin/python scripts/probes/convergence.py NAME '{"model": {"d_model": 96}}' STEPS
FB: frame budget per batch; SORTA=1: shortest batches first; SAME=1: one batch over and over (memorization check)."""
import sys, json, time, torch
from pathlib import Path
from types import SimpleNamespace
from asrflow.train.params import TrainParams
from asrflow.train.distributed import World
from asrflow.train.run import build_context
from asrflow.train.trainer import compute_loss, step_seed, learning_rate
name=sys.argv[1]; over=json.loads(sys.argv[2]); steps=int(sys.argv[3])
base=dict(model=dict(name='conformer',d_model=144,num_heads=4,ffn_dim=576,num_layers=6,kernel_size=15,subsampling_channels=32),
          lr=1e-3,warmup_steps=30,precision='fp32',epochs=10,max_steps=steps,seed=1234)
for k,v in over.items():
    if isinstance(v,dict) and isinstance(base.get(k),dict) and v.get('name') is None: base[k]={**base[k],**v}
    else: base[k]=v
params=TrainParams.from_config(base)
args=SimpleNamespace(manifest=Path('results/prep/truncated.jsonl'),plan=Path('results/prep/buckets.json'),vocab=Path('results/prep/vocab.json'),
    cmvn=Path('results/prep/cmvn.json'),noise=Path('results/noise/manifest.jsonl'),out_dir=Path(f'/tmp/conv/{name}'))
ctx=build_context(args,params,World())
import os
if os.environ.get('FB'): ctx.sampler.plan.frame_budget=int(os.environ['FB'])
print('batches/epoch', len(ctx.sampler.global_batches(0)), flush=True)
batches=[b for e in range(5) for b in ctx.sampler.global_batches(e)]
if os.environ.get("SORTA"):
    d=ctx.sampler.plan.durations; e0=sorted(ctx.sampler.global_batches(0), key=lambda b: max(d[u] for u in b)); batches=e0+batches[len(e0):]
if os.environ.get("SAME"): batches=[batches[3]]*len(batches)
t0=time.time(); acc=[]
for i in range(steps):
    torch.manual_seed(i); ctx.aug.reseed(i)
    for g in ctx.optimizer.param_groups: g['lr']=learning_rate(params,i,steps,1)
    out=compute_loss(ctx.model,ctx.loss_fn,ctx.train_store.collate(batches[i]),ctx.logmel,ctx.aug,ctx.device,ctx.amp_dtype,ctx.class_weights)
    ctx.optimizer.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(ctx.model.parameters(),5.0); ctx.optimizer.step()
    acc.append(out.ctc.item())
    if (i+1)%10==0: print(name, i+1, 'ctc', round(sum(acc[-10:])/10,3), f'{time.time()-t0:.0f}s', flush=True)
