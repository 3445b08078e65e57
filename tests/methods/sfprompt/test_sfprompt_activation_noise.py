"""sfprompt.activation_noise: what the split service receives is the head output plus Gaussian noise of σ × its RMS
(nothing at 0), reproducible from the run seed per (round, client, phase, step), and prompts + tail still train."""

import pytest
import torch
from test_sfprompt import PROMPT, classification_examples, tiny_bert

from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.data import ExampleStream, collate
from pollinate.methods.sfprompt.client import service_body
from pollinate.methods.sfprompt.noise import EVALUATION, TRAINING, NoisyBody, activation_noise_seed
from pollinate.methods.sfprompt.service import LocalBody
from pollinate.methods.sfprompt.split import PromptedSplitModel, decode_tensor, split_model
from pollinate.methods.sfprompt.training import train_prompts_and_tail

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingBody(LocalBody):
    """The in-process service, keeping every activation tensor it received."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[torch.Tensor] = []

    def _invoke(self, method, request):
        if method == "Forward":
            self.received.append(decode_tensor(request.hidden))
        return super()._invoke(method, request)


def _cfg(noise: float):
    return build_config(None, ["train.batch_size=4", "train.lr=0.01", f"sfprompt.activation_noise={noise}"])


def _sent(noise: float, server_round: int = 1, phase: int = TRAINING) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean head output, what the service received) for one batch through the client's body."""
    parts = split_model(tiny_bert(), 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    batch = collate(classification_examples(4, length=8), 0)
    channel = RecordingBody(parts.body)
    body = service_body(channel, _cfg(noise), server_round, client_id=3, phase=phase)
    with torch.no_grad():
        out = parts.head(batch["input_ids"], batch["attention_mask"])
        body(out.hidden, out.attention_mask)
    return out.hidden, channel.received[0]


def test_without_noise_the_service_receives_the_head_output_unchanged():
    clean, received = _sent(0.0)
    torch.testing.assert_close(received, clean, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_with_noise_the_service_receives_the_head_output_plus_gaussian_noise_of_sigma_times_its_rms(sigma):
    clean, received = _sent(sigma)
    noise = received - clean
    rms = float(clean.square().mean().sqrt())
    assert float(noise.std()) == pytest.approx(sigma * rms, rel=0.05)
    assert abs(float(noise.mean())) < 0.1 * sigma * rms
    # Independent of the signal: the noise does not follow the activations.
    assert abs(float(torch.corrcoef(torch.stack([noise.flatten(), clean.flatten()]))[0, 1])) < 0.1


def test_the_noise_reproduces_from_the_run_seed_and_differs_across_rounds_and_phases():
    _, first = _sent(0.3)
    _, again = _sent(0.3)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    for other in (_sent(0.3, server_round=2)[1], _sent(0.3, phase=EVALUATION)[1]):
        assert not torch.allclose(first, other)
    assert activation_noise_seed(11, 1, 3, TRAINING) != activation_noise_seed(11, 1, 3, EVALUATION)


def test_each_step_draws_new_noise():
    body = NoisyBody(lambda hidden, mask: hidden, 1.0, seed=5)
    hidden = torch.ones(2, 3, 4)
    assert not torch.allclose(body(hidden, None), body(hidden, None))


def test_prompts_and_tail_still_train_through_noisy_activations():
    parts = split_model(tiny_bert(), 1, 1, PROMPT, generator=torch.Generator().manual_seed(0))
    data = classification_examples(8, length=6)
    batch = collate(data, 0)
    model = PromptedSplitModel(parts).eval()

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    body = NoisyBody(LocalBody(parts.body), 0.5, seed=1)
    stream = ExampleStream(data, 4, 0, seed=0)
    train_prompts_and_tail(parts, stream, 0, stream, 40, body, _cfg(0.5))
    assert loss() < 0.8 * before  # evaluated without noise


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf"])
def test_config_refuses_a_negative_or_non_finite_noise(value):
    with pytest.raises(ConfigError, match="'sfprompt.activation_noise'"):
        _cfg(value)
