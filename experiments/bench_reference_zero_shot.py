"""Time a PyTorch zero-shot pass that scores one image at a time, as the reference code does.

Stand-in for the reference's zero-shot loop: transformers' PyTorch `CLIPModel` with random
ViT-B/32 weights, float32, `torch.no_grad()`, one image per forward call. Prints one JSON line
with images per second. Needs `pip install torch==2.13.0` (the tests install it).

  python experiments/bench_reference_zero_shot.py --images 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="images per forward call")
    args = parser.parse_args(argv)

    config = transformers.CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                     "num_hidden_layers": 12, "projection_dim": 512},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "patch_size": 32, "image_size": 224,
                       "projection_dim": 512},
        projection_dim=512)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    images = torch.randn(args.images, 3, 224, 224)
    with torch.no_grad():
        model.get_image_features(pixel_values=images[:args.batch])
        started = time.perf_counter()
        for start in range(0, args.images, args.batch):
            model.get_image_features(pixel_values=images[start:start + args.batch])
        seconds = time.perf_counter() - started
    print(json.dumps({"pass": "zero_shot_reference_pytorch", "batch": args.batch,
                      "images": args.images, "images_per_second": args.images / seconds,
                      "torch_threads": torch.get_num_threads(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
