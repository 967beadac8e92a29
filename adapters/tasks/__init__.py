"""The task layer: what serving and training both need to turn requests and examples into
model inputs and back, and nothing of HTTP or Ray. Tokenisation (`tokens`), question-answering
windows and answer decoding (`qa`), image checking and decoding (`images`), pixels from a
base's image processor (`pixels`), base-model loading and modality (`model_loader`), and the
plain exceptions requests fail with (`errors`). It imports only the adapters core; serving and
`adapters.training` import it. The package re-exports nothing.
"""
