"""The image pipeline shared by extraction and training: decode, worker / device transforms, batches, store loader.

Nothing here imports from ``featurelt.extract`` or ``featurelt.encoders``; importing the package
loads neither torch nor lance (the submodules do).
"""
