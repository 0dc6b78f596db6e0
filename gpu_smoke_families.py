import time, torch
from tests.test_families import FAMILIES, family_model
from tests.helpers import make_batch, clone, rel_err
from lightning_horizon import HorizonEngine
for fam in sorted(FAMILIES):
    t = time.time()
    ref = family_model(fam)
    batch = make_batch(0)
    r = clone(ref); out = r(**batch); out.loss.backward()
    want = {n: p.grad for n, p in r.named_parameters()}
    for dtype in ("fp32", "bf16"):
        m = clone(ref)
        eng = HorizonEngine(m, device="cuda", compute_dtype=dtype, checkpoint_every=2)
        for step in range(2):
            m.zero_grad(set_to_none=True)
            o = m(**batch); o.loss.backward(); eng.finish_backward()
        worst = max((rel_err(p.grad, want[n]) if p.grad is not None else 9.0) for n, p in m.named_parameters())
        aux = getattr(o, "aux_loss", None)
        print(f"{fam:12s} {dtype} loss {o.loss.item():.5f} ref {out.loss.item():.5f} aux {None if aux is None else round(aux.item(), 5)} worst grad rel {worst:.1e} {time.time()-t:.1f}s", flush=True)
        eng.close()
