"""benchmarks/stream_startup.py: both tracings of the view functions build a stream whose
first batch it times."""

from msf_jax.data import pipeline

from helpers import benchmark

stream_startup = benchmark('stream_startup')


def test_both_tracings_build_the_stream_and_draw_a_batch(monkeypatch):
  # The AutoGraph mode replaces pipeline._as_written (the benchmark runs each mode in a
  # process of its own); setting it to itself here makes monkeypatch restore it afterwards.
  monkeypatch.setattr(pipeline, '_as_written', pipeline._as_written)
  times = stream_startup.measure('as_written')
  assert pipeline._as_written(len) is not len  # wrapped: traced without AutoGraph's rewrite
  assert times['build_s'] > 0 and times['first_batch_s'] > 0
  times = stream_startup.measure('autograph')
  assert pipeline._as_written(len) is len  # tf.data's default applies
  assert times['build_s'] > 0 and times['first_batch_s'] > 0
