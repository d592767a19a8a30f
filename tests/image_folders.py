"""Generated image folders for end-to-end tests: noisy coloured squares, one class per colour."""

import numpy as np
import PIL.Image

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220),
           "yellow": (220, 220, 40)}


def write_image_folder(root, colours=COLOURS, *, train_per_class=4, test_per_class=1):
    """Write 32x32 PNGs into ROOT/{train,test}/<class>/: noise with a 16x16 square of the colour.

    The square sits at a random place drawn from a seeded generator, so the images are the same
    on every call with the same arguments.
    """
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.normal(128, 30, (32, 32, 3))
                top, left = rng.integers(0, 16, size=2)
                pixels[top:top + 16, left:left + 16] = colour
                image = PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{name}_{i}.png")
