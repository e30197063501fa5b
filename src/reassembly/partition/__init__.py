"""Cover-set partition (DeRy §3): cut every model of a zoo into K blocks and group the blocks into K equivalence sets.

The stage reads the point-CKA matrices of the similarity stage (``points[(a, b)]``: CKA between the features of
models ``a`` and ``b`` at every "point", the tensor entering each chain node plus the model output, on the same probe
images) and the chains' node metadata (:class:`ModelNodes`: body range and per-node parameters). It writes a
:class:`Partition`, which the caller saves as ``partition.json`` through ``Partition.to_dict()`` and reads back with
``Partition.from_dict()``. The algorithm reads and writes no files itself; :func:`partition_zoo` (``stage.py``) is the stage around it, from a
similarity run's directory to ``partition.json`` and its diagram.

>>> result = partition(models, points, k=4, eps=0.2)      # stage_aligned=True, similarity="io", size="nodes"
>>> result.blocks["resnet20"], result.sets[0].members, result.score

Official behaviours kept as explicit options (dery-spec §3.3, §3.4, §8.2):

* ``stage_aligned=True`` (default) fixes set j to the j-th block of every model, which is what the official code's
  stage-index typo produces in practice, and guarantees that one block per set in set order is a feasible network;
  ``stage_aligned=False`` is the paper's general clustering.
* ``similarity="first_last"`` takes the output of a block's first node for its input, as the official code does;
  ``"io"`` (default) uses the true block input, as the paper defines it.
* ``size="nodes"`` caps blocks at ``ceil((1 + eps) * L / K)`` nodes, as the code counts; ``size="params"`` caps them
  at ``(1 + eps) / K`` of the body's parameters, as the paper means.

Fixed, not optional: the cap is checked on the block that receives a node (the code checked the donor), random
initial partitions respect the cap, two blocks of the same model score 0 (2 for a block with itself), and a restart
stops when it stops improving on its *own* best (the code compared with the global best and never reset).
"""

from .cover import SIMILARITIES, SIZES, block_similarity, partition
from .result import EquivalenceSet, ModelNodes, Partition, PartitionError
from .stage import model_nodes, partition_zoo

__all__ = [
    "SIMILARITIES", "SIZES", "EquivalenceSet", "ModelNodes", "Partition", "PartitionError", "block_similarity",
    "model_nodes", "partition", "partition_zoo",
]
