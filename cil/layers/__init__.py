"""The building blocks strategies are made of, each usable on its own in any PyTorch project.

``growing`` (tensors that grow with the classes), ``prototypes`` (class means), ``lda`` (streaming LDA, FSA's
head), ``etf`` (Mamba-FSCIL's fixed ETF head and dot-regression loss), ``adapters`` (MOS's bottleneck adapters),
``film`` (FSA's FiLM layers), ``ssm`` (Mamba-FSCIL's selective-SSM projector), ``retrieval`` (MOS's adapter
retrieval), ``statistics`` (class Gaussians for classifier alignment).
"""
