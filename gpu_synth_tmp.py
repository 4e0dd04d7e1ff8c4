import sys, time, torch
sys.path.insert(0, "tests")
from test_predictor import synthetic, C
from ltta.models.loss_predictor import LossPredictor
from ltta.training.predictor import PredictorConfig, train_predictor
xt, lt = synthetic(4096, 0); xv, lv = synthetic(512, 1)
for kw in [dict(), dict(cutout=0.0), dict(objective="spearman", rank_temperature=0.1), dict(objective="spearman", rank_temperature=0.1, cutout=0.0)]:
    torch.manual_seed(0); t = time.time()
    _, h = train_predictor(LossPredictor(C, 16), xt, lt, xv, lv, PredictorConfig(epochs=15, batch_size=256, **kw), device="cuda", progress=False)
    print(kw, [round(m["valid_spearman_rho"], 3) for m in h][::2], round(h[-1]["valid_top1_agreement"], 3), round(time.time() - t, 1), flush=True)
