import pytest

from omniquant.config import ActQuant, CalibConfig, OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError


@pytest.mark.parametrize("bits", [1, 9, 16, 0, -3])
def test_weight_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match="weight bits"):
        WeightQuant(bits=bits)


@pytest.mark.parametrize("group", [-1, -128])
def test_group_size_must_be_positive(group):
    with pytest.raises(ConfigError, match="group size"):
        WeightQuant(bits=4, group_size=group)


@pytest.mark.parametrize("bits", [2, 3, 9])
def test_activation_bits(bits):
    with pytest.raises(ConfigError, match="activation bits"):
        ActQuant(bits=bits)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": -1}, "epochs"),
        ({"nsamples": 0}, "nsamples"),
        ({"seqlen": 1}, "seqlen"),
        ({"nsamples": 10, "batch_size": 4}, "multiple"),
        ({"lwc_lr": 0}, "lwc_lr"),
        ({"method": "gptq"}, "method"),
        ({"loss": "l1"}, "loss"),
    ],
)
def test_calibration_settings_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CalibConfig(**kwargs)


def test_config_round_trips_through_a_dict_and_names_its_setting():
    cfg = OmniQuantConfig(WeightQuant(3, 128), ActQuant(16), CalibConfig(epochs=5, aug_loss=True))
    assert OmniQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.label == "W3A16g128"
    with pytest.raises(ConfigError):
        OmniQuantConfig.from_dict({**cfg.to_dict(), "weight": {"bits": 4, "colour": 1}})


def test_rtn_and_zero_epochs_train_nothing():
    assert not CalibConfig(method="rtn").trains
    assert not CalibConfig(epochs=0).trains
    assert CalibConfig(epochs=1).trains


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"nsamples": 16}, 2),
        ({"nsamples": 32}, 4),
        ({"nsamples": 4}, 1),
        ({"nsamples": 4, "batch_size": 2}, 2),
        ({"nsamples": 64, "batch_size": 4}, 8),
        ({"nsamples": 16, "val_samples": 0}, 0),
        ({"nsamples": 16, "val_samples": 5}, 5),
        ({"nsamples": 16, "method": "rtn"}, 0),
        ({"nsamples": 16, "epochs": 0}, 0),
    ],
)
def test_held_out_windows_default_to_an_eighth_of_the_calibration_windows(kwargs, expected):
    assert CalibConfig(**kwargs).val_windows == expected


@pytest.mark.parametrize("kwargs", [{"val_samples": -1}, {"val_samples": 3, "batch_size": 2}])
def test_held_out_windows_must_fill_whole_batches(kwargs):
    with pytest.raises(ConfigError, match="val_samples"):
        CalibConfig(nsamples=4, **kwargs)


def test_patience_and_order_defaults():
    cfg = CalibConfig()
    assert cfg.patience == 2 and cfg.shuffle is False
    with pytest.raises(ConfigError, match="patience"):
        CalibConfig(patience=-1)
