"""raydistill: offline knowledge distillation of language models at cluster scale.

The teacher runs once (``raydistill precompute``) and stores a sparse picture of its
next-token distribution in compressed shards; any number of students then train from
those shards (``raydistill train``) without ever loading the teacher.
"""

__version__ = "0.1.0"
