"""The PurifiedLearning demo: handwritten digits with a background-texture nuisance.

Data: scikit-learn's bundled digits (1797 grey 8x8 images, 10 classes, no download). A fixed
split keeps 797 images for test; each seed draws its small training set from the other 1000.

Task-irrelevant labels: every image gets one of four background textures (horizontal stripes,
vertical stripes, a checkerboard, diagonal stripes) at a random phase and a random contrast,
added to the digit; the texture's id is the task-irrelevant label. It is made up by us and says
nothing about the digit:

- regime ``independent``: the texture is drawn uniformly, independently of the digit, for the
  training and the test images;
- regime ``correlated``: in the small training set the texture is ``digit mod 4`` with probability
  ``rho`` (default 0.9) and uniform otherwise, a shortcut a plain network can latch onto; at test
  it is uniform and independent of the digit, so the shortcut does not pay.

Arms, everything else equal (same main encoder and task head, same initialization per seed, same
training set, same batches, optimizer, learning rate and number of steps):

- ``plain``: main encoder -> task head, task loss only;
- ``multitask``: the same network with an irrelevant head on its features, trained on task loss
  plus irrelevant loss, no purification;
- ``purified``: PurifiedLearning with subspace purification of the input (``--variant
  subspace``, the default): a :class:`~purified_ops.recipe.learning.LowRankProbe` learns K = 16
  directions of pixel space from which a small MLP must predict the texture label; a
  ``PurifyLayer`` removes that subspace (one set of directions shared by all samples) from every
  image before the same main encoder and task head. Two stages: the probe learns the texture
  first, with its loss balanced against the digit (``fit(balance_irrelevant=True)``, so that it
  cannot learn digits where the texture follows the digit), then it is frozen and the network
  learns the task; ``--schedule joint --no-balance`` trains both together, unbalanced.
  ``--variant per_sample`` is the per-sample form: a task-irrelevant encoder of the main encoder's
  architecture gives each sample one direction in main-feature space, which is removed from its
  main features.

``--nuisance grating`` swaps the texture for a sinusoidal grating (8 orientations x 3 frequencies,
random phase; the labels are orientation and frequency; correlated: orientation = ``digit mod 8``),
whose subspace changes from image to image. Its arms: plain, multitask, ``shared`` (the subspace
arm above), ``per_sample`` (a :class:`~purified_ops.recipe.learning.ClassSubspaceBank`: two directions per
orientation-frequency class learned from the labels; each image is purified against its most
probable classes' subspaces), and two oracle reference rows that know the true gratings.

``--nuisance-pool M`` gives the purified arms' nuisance branch (the bank, the shared subspace)
M more images that carry only nuisance labels, drawn outside the training, validation and test
images (:func:`load_nuisance_pool`); the main network still sees only the task-labelled images.
Its images' digits are the plain network's predictions (``--pool-labels pseudo``).

The variants were chosen on a validation split carved from the training pool (:func:`load_validation`,
``scripts/demo_validation.py``), never on the test set; docs/demo.md reports every variant tried.

The package, by job: :mod:`.data` (digits, splits, nuisances), :mod:`.arms` (networks and one
run of an arm), :mod:`.tables` (statistics, tables, plots), :mod:`.jobs` (runs in worker
processes) and :mod:`.cli` (the command's arguments, report and JSON line).
"""
from . import arms, cli, data, jobs, tables
from .arms import *  # noqa: F401,F403  (each module's __all__)
from .cli import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .jobs import *  # noqa: F401,F403
from .tables import *  # noqa: F401,F403

__all__ = [*data.__all__, *arms.__all__, *tables.__all__, *jobs.__all__, *cli.__all__]
