"""Training across devices and machines: device set-up and the distribution strategy (devices.py), and the
multi-worker cluster (cluster.py: TF_CONFIG, collectives, the loopback launcher of tasks/train/worker.py).

May import: tasks.store.
"""
