import torch, traceback
from ddmkit.io import save_tensors
from ddmkit.config import ExpertConfig, NetConfig, TrainConfig
from ddmkit.train.jobs import train_expert
save_tensors("/tmp/s.safetensors", {"x": torch.randn(300, 2)}, {"cluster": 0, "k": 1})
cfg = ExpertConfig(net=NetConfig(arch="mlp", kwargs={"width": 16, "depth": 1}), train=TrainConfig(steps=30, batch_size=32, warmup=5, device="auto"))
try:
    train_expert("/tmp/s.safetensors", cfg, "/tmp/e1")
    print("ok")
except Exception:
    traceback.print_exc()
