"""Time a PyTorch CAP iteration shaped like the reference implementation's; print one JSON line.

The official PyTorch code cannot be fetched on the machines this project is built on, so this
script rebuilds the cost structure of its training iteration on transformers' PyTorch CLIP
(random ViT-B/32 weights, float32), to measure it side by side with
`experiments/bench_step.py` on the same machine:

  * MaPLe prompts: 2 context tokens, prompt depth 8, text prompts projected to the vision width
    (shallow and deep), as in `cap_jax.prompts`;
  * the model is called once per image batch (main, labeled, unlabeled strong with gradients;
    unlabeled weak under `torch.no_grad`), and every call encodes the prompted text of all
    classes at the full 77 tokens;
  * one backward pass over the summed losses, then an SGD step on the prompt parameters.

The adapters (three small MLPs on the features) and the margin are left out: their cost is
negligible next to the towers. The weak view runs without gradients here; if the reference
builds a graph for it too, the reference is slower than this script says.

  python experiments/bench_reference_step.py --classes 10 --batch 32 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time


def build(num_classes: int, depth: int = 8, n_ctx: int = 2):
    import torch
    import transformers

    config = transformers.CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                     "num_hidden_layers": 12, "projection_dim": 512,
                     "max_position_embeddings": 77},
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "patch_size": 32, "image_size": 224,
                       "projection_dim": 512},
        projection_dim=512)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    text_width, vision_width = 512, 768
    prompts = torch.nn.ParameterDict({
        "ctx": torch.nn.Parameter(0.02 * torch.randn(n_ctx, text_width)),
        "deep_text": torch.nn.Parameter(0.02 * torch.randn(depth - 1, n_ctx, text_width)),
    })
    projections = torch.nn.ModuleList(
        [torch.nn.Linear(text_width, vision_width) for _ in range(depth)])

    # Token ids of "a photo of a class k." padded to 77: SOS, 6 tokens, EOT, zeros.
    token_ids = torch.zeros(num_classes, 77, dtype=torch.long)
    token_ids[:, 0] = 49406
    token_ids[:, 1:7] = torch.randint(300, 40000, (num_classes, 6))
    token_ids[:, 7] = 49407
    eot = torch.full((num_classes,), 7)
    with torch.no_grad():
        embeddings = model.text_model.embeddings.token_embedding(token_ids)
    causal = torch.full((77, 77), float("-inf")).triu(1)[None, None]

    def text_features():
        ctx = prompts["ctx"].expand(num_classes, -1, -1)
        x = torch.cat([embeddings[:, :1], ctx, embeddings[:, 1 + n_ctx:]], dim=1)
        x = x + model.text_model.embeddings.position_embedding.weight
        for i, layer in enumerate(model.text_model.encoder.layers):
            if 1 <= i < depth:
                deep = prompts["deep_text"][i - 1].expand(num_classes, -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n_ctx:]], dim=1)
            x = layer(x, causal.expand(num_classes, 1, 77, 77))
        x = model.text_model.final_layer_norm(x)
        return model.text_projection(x[torch.arange(num_classes), eot])

    def image_features(images):
        batch = images.shape[0]
        x = model.vision_model.embeddings(images)
        shallow = projections[0](prompts["ctx"]).expand(batch, -1, -1)
        x = model.vision_model.pre_layrnorm(torch.cat([x, shallow], dim=1))
        for i, layer in enumerate(model.vision_model.encoder.layers):
            if 1 <= i < depth:
                deep = projections[i](prompts["deep_text"][i - 1]).expand(batch, -1, -1)
                x = torch.cat([x[:, :-n_ctx], deep], dim=1)
            x = layer(x, None)
        x = model.vision_model.post_layernorm(x[:, 0])
        return model.visual_projection(x)

    def logits(images):
        text = text_features()
        image = image_features(images)
        text = text / text.norm(dim=-1, keepdim=True)
        image = image / image.norm(dim=-1, keepdim=True)
        return 100.0 * image @ text.T

    parameters = list(prompts.parameters()) + list(projections.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9, weight_decay=0.1)
    return logits, optimizer


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="images per stream")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args(argv)

    logits, optimizer = build(args.classes)
    generator = torch.Generator().manual_seed(0)

    def images():
        return torch.randn(args.batch, 3, 224, 224, generator=generator)

    batches = {name: images() for name in ("main", "labeled", "weak", "strong")}
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator)

    def iteration():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits(batches["main"]), labels)
        loss = loss + torch.nn.functional.cross_entropy(logits(batches["labeled"]), labels)
        with torch.no_grad():
            pseudolabels = logits(batches["weak"]).argmax(-1)
        loss = loss + torch.nn.functional.cross_entropy(logits(batches["strong"]), pseudolabels)
        loss.backward()
        optimizer.step()

    iteration()
    seconds = []
    for _ in range(args.iterations):
        started = time.perf_counter()
        iteration()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    print(json.dumps({
        "pass": "train_step_reference_shape_pytorch", "classes": args.classes,
        "batch_per_stream": args.batch, "paradigm": "SSL", "seconds_per_iteration": median,
        "images_per_second": 4 * args.batch / median,
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
