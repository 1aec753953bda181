"""Every model's admin changelist and change form load, and the admin refuses unsafe configs."""

import pytest
from django.urls import reverse

from studio.models import (
    AudioSample,
    Checkpoint,
    Dataset,
    MetricPoint,
    Run,
    RunEvent,
    Speaker,
    TrainingConfig,
    Utterance,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def objects(admin_user_):
    ds = Dataset.objects.create(owner=admin_user_, name="ds")
    spk = Speaker.objects.create(dataset=ds, name="spk", embedding=[0.0] * 256)
    utt = Utterance.objects.create(dataset=ds, speaker=spk, item_id="u1", text="hello")
    cfg = TrainingConfig.objects.create(owner=admin_user_, name="cfg")
    run = Run.objects.create(
        owner=admin_user_, dataset=ds, config=cfg, config_snapshot=cfg.values()
    )
    mp = MetricPoint.objects.create(run=run, step=1, name="loss/total", value=1.0)
    ev = RunEvent.objects.create(run=run, step=1, kind="adaptive", message="raised mel weight")
    ck = Checkpoint.objects.create(run=run, step=1, path="/tmp/x.pt")
    sample = AudioSample.objects.create(run=run, step=1, audio="samples/x.wav")
    return [ds, spk, utt, cfg, run, mp, ev, ck, sample]


def test_changelists_and_change_forms_load(client, admin_user_, objects):
    client.force_login(admin_user_)
    for obj in objects:
        meta = obj._meta
        changelist = reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
        assert client.get(changelist).status_code == 200, changelist
        assert client.get(changelist + "?q=x").status_code == 200, changelist
        change = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
        assert client.get(change).status_code == 200, change


def test_admin_refuses_unsafe_config(client, admin_user_, objects):
    client.force_login(admin_user_)
    cfg = TrainingConfig.objects.get()
    url = reverse("admin:studio_trainingconfig_change", args=[cfg.pk])
    data = {
        k: v
        for k, v in cfg.values().items()
        if not k.startswith("size") and k != "optimization_level"
    }
    data.update(
        owner=admin_user_.pk,
        name="cfg",
        description="",
        model_size="tiny",
        optimization_level="basic",
        mel_loss_weight=35,
        extra="{}",
        use_adaptive_weights="on",
    )
    response = client.post(url, data)
    assert response.status_code == 200  # the form again, with the error
    assert "safe range 1-5" in response.content.decode()
    cfg.refresh_from_db()
    assert cfg.mel_loss_weight == 2.5


def test_non_staff_cannot_use_admin(client, user):
    client.force_login(user)
    response = client.get("/admin/")
    assert response.status_code == 302 and "login" in response["Location"]
