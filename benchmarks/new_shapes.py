"""What a call on a batch size never seen before costs on a GPU: the image UNet on repeated,
new and again-seen batch sizes (ms per call), eager, and with the rows padded to bucket sizes.

    PYTHONPATH=src python benchmarks/new_shapes.py
"""
import time

import torch

from ddmkit.nets.unet import UNet
from ddmkit.accel.padding import bucket_size


def main() -> None:
    torch.manual_seed(0)
    net = UNet([1, 32, 32], channels=[32, 64, 64], blocks=1, attention_res=[8], num_classes=10).cuda().eval()

    def call(n: int) -> float:
        x, t = torch.randn(n, 1, 32, 32, device="cuda"), torch.rand(n, device="cuda")
        y = torch.randint(10, (n,), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            net(x, t, y)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    def median(v):
        return sorted(v)[len(v) // 2]

    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; cudnn {torch.backends.cudnn.version()}")
    for base in (128, 1024):
        call(base), call(base)
        sizes = [base + 7 * i + 1 for i in range(12)]
        same = median([call(base) for _ in range(12)])
        new = median([call(n) for n in sizes])
        again = median([call(n) for n in sizes])
        padded_sizes = sorted({bucket_size(n) for n in sizes})
        padded_new = median([call(bucket_size(n)) for n in sizes[::-1]])
        print(f"base {base}: same size {same:.2f} ms, new sizes {new:.2f} ms, the same new sizes again "
              f"{again:.2f} ms; padded to {padded_sizes}: {padded_new:.2f} ms")
    torch.backends.cudnn.enabled = False
    call(2000)
    print(f"cudnn off: new sizes {median([call(3000 + 5 * i) for i in range(12)]):.2f} ms, "
          f"same {median([call(3000) for _ in range(12)]):.2f} ms")


if __name__ == "__main__":
    main()
