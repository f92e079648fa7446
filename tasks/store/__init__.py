"""The artifact store: every path, local or in a bucket, goes through storage.py; publish.py is the one
reuse-or-publish path of every stage (manifest last, all-or-nothing for readers); refs.py holds the typed
references the stages hand each other and `cache:` references; staging.py the local copies of what lives in a
bucket; lease.py the per-fingerprint leases and process liveness; gc.py the clean-up of a root.

May import: nothing else of tasks/ (the bottom room, with errors.py).
"""
