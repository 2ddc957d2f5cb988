'''The faithfulness metric on hand-built cases whose curves are known.'''
import pytest
import torch

from captum_mamba.metrics import faithfulness


class TokenSum(torch.nn.Module):
    '''f_c(x) = sum_t w_c . x_t: each token contributes w_c . x_t, so attributions x_t * w_c are exact.'''

    def __init__(self, weights):
        super().__init__()
        self.weights = weights  # (classes, features)

    def forward(self, x, scale=None):
        output = x.sum(1) @ self.weights.T
        return output if scale is None else output * scale[:, None]


def test_step_two_hand_computed():
    model = TokenSum(torch.tensor([[1.0]], dtype=torch.float64))
    inputs = torch.tensor([[[3.0], [1.0], [-2.0], [0.5]]], dtype=torch.float64)
    result = faithfulness(model, inputs, inputs, target=0, step=2)
    assert result.fractions.tolist() == [0.0, 0.5, 1.0]
    assert result.morf.tolist() == [[2.5, -1.5, 0.0]]  # remove 3 and 1, then the rest
    assert result.lerf.tolist() == [[2.5, 4.0, 0.0]]  # remove -2 and 0.5, then the rest
    assert result.area_morf.item() == pytest.approx(0.5 * (0.5 - 0.75))
    assert result.area_lerf.item() == pytest.approx(0.5 * (3.25 + 2.0))
    assert result.delta_af.item() == pytest.approx(2.625 + 0.125)


def test_uneven_last_step():
    model = TokenSum(torch.tensor([[1.0]], dtype=torch.float64))
    inputs = torch.tensor([[[3.0], [1.0], [-2.0]]], dtype=torch.float64)
    result = faithfulness(model, inputs, inputs, target=0, step=2)
    assert result.fractions.tolist() == pytest.approx([0.0, 2 / 3, 1.0])
    assert result.morf.tolist() == [[2.0, -2.0, 0.0]]


def test_replacement_per_position_is_a_baseline():
    model = TokenSum(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    inputs = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)  # contributions 3 and 4
    baseline = torch.tensor([[[0.5, 0.0], [1.0, 1.0]]], dtype=torch.float64)  # contributions 0.5 and 3
    result = faithfulness(model, inputs, inputs * model.weights, target=0, replacement=baseline)
    assert result.morf.tolist() == [[7.0, 6.0, 3.5]]  # token 1 (4 -> 3), then token 0 (3 -> 0.5)
    assert result.lerf.tolist() == [[7.0, 4.5, 3.5]]


def test_batches_targets_and_forward_arguments_are_kept_per_example():
    torch.manual_seed(0)
    model = TokenSum(torch.randn(3, 4, dtype=torch.float64))
    inputs = torch.randn(5, 6, 4, dtype=torch.float64)
    targets = [0, 2, 1, 1, 0]
    scale = torch.arange(1.0, 6.0, dtype=torch.float64)
    attributions = inputs * model.weights[targets][:, None, :]
    whole = faithfulness(model, inputs, attributions, target=targets, additional_forward_args=(scale,))
    one_by_one = faithfulness(model, inputs, attributions, target=targets, additional_forward_args=(scale,),
                              max_examples_per_batch=2)
    for first, second in zip(whole, one_by_one):
        assert (first is None and second is None) or torch.allclose(first, second)
    for index, target in enumerate(targets):
        single = faithfulness(model, inputs[index:index + 1], attributions[index:index + 1], target=target,
                              additional_forward_args=(scale[index:index + 1],))
        assert torch.allclose(single.morf, whole.morf[index:index + 1])
    # the unperturbed point is the explained output
    assert torch.allclose(whole.morf[:, 0], model(inputs, scale)[torch.arange(5), targets])


class LargestToken(torch.nn.Module):
    '''f(x) = max_t x_t (one feature): not additive, so insertion and deletion differ.'''

    def forward(self, x):
        return x[..., 0].max(1).values[:, None]


def test_insertion_hand_computed_on_a_nonadditive_model():
    inputs = torch.tensor([[[3.0], [1.0], [-2.0]]], dtype=torch.float64)
    result = faithfulness(LargestToken(), inputs, inputs, target=0, replacement=0.0, insertion_baseline=-5.0)
    # deletion to 0: MoRF removes 3 (max 1), 1 (max 0), -2 (max 0); LeRF removes -2 (3), 1 (3), 3 (0)
    assert result.morf.tolist() == [[3.0, 1.0, 0.0, 0.0]]
    assert result.lerf.tolist() == [[3.0, 3.0, 3.0, 0.0]]
    # insertion into -5: MoRF puts back 3 (max 3), ...; LeRF puts back -2 (max -2), 1 (1), 3 (3)
    assert result.insertion_morf.tolist() == [[-5.0, 3.0, 3.0, 3.0]]
    assert result.insertion_lerf.tolist() == [[-5.0, -2.0, 1.0, 3.0]]
    third = 1 / 3
    assert result.area_insertion_morf.item() == pytest.approx(third * (-1.0 + 3.0 + 3.0))
    assert result.area_insertion_lerf.item() == pytest.approx(third * (-3.5 - 0.5 + 2.0))
    assert result.delta_ai.item() == pytest.approx(third * 7.0)
    assert result.delta_af.item() == pytest.approx(third * (3.0 + 3.0 + 1.5 - 2.0 - 0.5 - 0.0))


def test_insertion_into_the_deletion_value_mirrors_deletion():
    '''Inserting the k most relevant features is deleting the length - k least relevant ones.'''
    torch.manual_seed(2)
    inputs = torch.randn(4, 6, 1, dtype=torch.float64)
    scores = torch.randn(4, 6, dtype=torch.float64)
    result = faithfulness(LargestToken(), inputs, scores, target=0, replacement=0.5, insertion_baseline=0.5, step=2)
    assert torch.equal(result.insertion_morf, result.lerf.flip(1))
    assert torch.equal(result.insertion_lerf, result.morf.flip(1))
    assert torch.allclose(result.delta_ai, result.delta_af)
    assert faithfulness(LargestToken(), inputs, scores, target=0).delta_ai is None


def test_exact_attributions_beat_random_which_beat_reversed():
    torch.manual_seed(1)
    model = TokenSum(torch.randn(1, 8, dtype=torch.float64))
    inputs = torch.randn(20, 30, 8, dtype=torch.float64)
    exact = inputs * model.weights
    random = torch.randn(20, 30, 1, dtype=torch.float64)
    scores = [faithfulness(model, inputs, attributions, target=0).delta_af.mean()
              for attributions in (exact, random, -exact)]
    assert scores[0] > scores[1] > scores[2]
    assert scores[0] > 0 > scores[2]


def test_bad_arguments_are_refused():
    model = TokenSum(torch.ones(1, 1))
    inputs = torch.ones(2, 3, 1)
    with pytest.raises(ValueError, match='step must be a positive number'):
        faithfulness(model, inputs, inputs, target=0, step=0)
    with pytest.raises(ValueError, match=r'do not match the inputs \(2, 3, 1\)'):
        faithfulness(model, inputs, torch.ones(2, 4), target=0)
