"""The five stages of tfpipe as plain functions over TensorFlow and pyarrow (no Prefect here)."""
