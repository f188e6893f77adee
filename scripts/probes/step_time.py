"""Step time of candidate acoustic models on one real batch (run from the repo root after `make run`):
    .venv/bin/python scripts/probes/step_time.py
Prints parameters, seconds per optimizer step and audio-seconds per second, one thread."""
import time, torch, json, sys
from asrflow.manifest import read_manifest
from asrflow.text import CharVocab
from asrflow.train.data import AudioStore
from asrflow.train.features import LogMel
from asrflow.train.models import build_model
from asrflow.train.losses import build_ctc_loss
torch.set_num_threads(1)
utts=[u for u in read_manifest('results/prep/truncated.jsonl') if u.split=='train']
utts=sorted(utts,key=lambda u:u.duration)[800:840]
vocab=CharVocab.load('results/prep/vocab.json')
store=AudioStore(utts,vocab)
ids=[u.id for u in utts]
b=store.collate(ids[:16])
print('batch audio s', b.audio_seconds, 'max', b.waves.shape)
lm=LogMel(80)
loss_fn=build_ctc_loss('smoothed',0.1)
cfgs=[
 ("d144 L6 ch144 bf16", dict(name='conformer',d_model=144,num_layers=6,subsampling_channels=144), torch.bfloat16),
 ("d144 L6 ch144 fp32", dict(name='conformer',d_model=144,num_layers=6,subsampling_channels=144), None),
 ("d144 L6 ch32 fp32", dict(name='conformer',d_model=144,num_layers=6,subsampling_channels=32), None),
 ("d144 L6 ch32 bf16", dict(name='conformer',d_model=144,num_layers=6,subsampling_channels=32), torch.bfloat16),
 ("d96 L4 ch32 fp32 ffn384", dict(name='conformer',d_model=96,num_layers=4,ffn_dim=384,subsampling_channels=32), None),
 ("d144 L6 ch32 sub6 fp32", dict(name='conformer',d_model=144,num_layers=6,subsampling_channels=32,subsampling=6), None),
]
for name,cfg,dt in cfgs:
    m=build_model(cfg,len(vocab),80)
    opt=torch.optim.AdamW(m.parameters(),1e-3)
    ts=[]
    for i in range(3):
        t=time.time()
        f,fl=lm(b.waves,b.wave_lens)
        with torch.autocast('cpu',dtype=dt or torch.float32,enabled=dt is not None):
            lp,ol=m(f,fl)
        out=loss_fn(lp.float(),ol,b.targets,b.target_lens)
        opt.zero_grad(); out.loss.backward(); opt.step()
        ts.append(time.time()-t)
    n=sum(p.numel() for p in m.parameters())
    print(f"{name}: params {n/1e6:.2f}M step {min(ts):.2f}s -> {b.audio_seconds/min(ts):.1f} audio-s/s", flush=True)
