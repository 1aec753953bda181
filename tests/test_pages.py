"""Login everywhere, the owner/staff rule on the pages, and config forms that refuse unsafe values."""

import pytest

from studio.models import TrainingConfig

pytestmark = pytest.mark.django_db

NAV_PAGES = ["/", "/datasets/", "/configs/", "/runs/", "/configs/new/"]


@pytest.mark.parametrize("url", [*NAV_PAGES, "/admin/"])
def test_anonymous_is_sent_to_sign_in(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.parametrize("url", NAV_PAGES)
def test_signed_in_pages_load(client_user, url):
    assert client_user.get(url).status_code == 200


def test_login_page_and_sign_in(client, user):
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302
    assert client.get("/").status_code == 200


def test_wrong_password_is_a_message_not_an_error(client, user):
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert b"didn't match" in response.content


def test_config_form_refuses_mel_weight_35_with_range(client_user):
    data = {
        "name": "old",
        "model_size": "tiny",
        "optimization_level": "basic",
        "batch_size": 16,
        "steps": 100,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 10,
        "grad_clip_norm": 1.0,
        "grad_accum_steps": 1,
        "eval_every": 50,
        "checkpoint_every": 50,
        "seed": 1,
        "use_adaptive_weights": "on",
        "mel_loss_weight": 35,
        "kl_loss_weight": 1,
        "duration_loss_weight": 1,
        "pitch_loss_weight": 0.1,
        "energy_loss_weight": 0.1,
        "align_loss_weight": 1,
        "bin_loss_weight": 0.1,
    }
    response = client_user.post("/configs/new/", data)
    assert response.status_code == 400
    assert b"safe range 1-5" in response.content
    assert not TrainingConfig.objects.exists()
    data["mel_loss_weight"] = 2.5
    assert client_user.post("/configs/new/", data).status_code == 302
    assert TrainingConfig.objects.get().owner.username == "alice"


def test_other_users_config_is_not_found(client_user, other_user):
    theirs = TrainingConfig.objects.create(owner=other_user, name="secret")
    assert client_user.get(f"/configs/{theirs.pk}/").status_code == 404
    page = client_user.get("/configs/").content.decode()
    assert "secret" not in page


def test_staff_sees_every_config(client, staff_user, other_user):
    TrainingConfig.objects.create(owner=other_user, name="bobs-config")
    client.force_login(staff_user)
    assert "bobs-config" in client.get("/configs/").content.decode()


def test_unknown_url_is_404_page(client_user):
    assert client_user.get("/no/such/page/").status_code == 404


def test_config_page_shows_the_adaptive_ablation(client_user):
    """Whoever switches the adaptive loss off sees what it was measured to do."""
    from studio.configs.views import adaptive_ablation

    ablation = adaptive_ablation()
    assert ablation is not None, "studio/configs/adaptive_ablation.json is missing or unreadable"
    assert {(r["start"], r["arm"]) for r in ablation["rows"]} >= {
        ("well", "fixed"),
        ("well", "new"),
    }
    html = client_user.get("/configs/new/").content.decode()
    assert 'id="adaptive-ablation"' in html
