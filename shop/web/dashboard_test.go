package web_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/vmgrid/vmgrid/deploy/grid"
)

// chromium is Debian's headless-capable browser (deploy/packages.txt).
func chromium(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("no chromium on this machine (apt-get install chromium)")
	return ""
}

// browser returns a tab of a fresh headless Chromium; every tab has its
// own sessionStorage, so its own sign-in.
func browser(ctx context.Context, t *testing.T) context.Context {
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, chromedp.DisableGPU, chromedp.WindowSize(1440, 1400),
		// The grid serves HTTPS with its own CA, which this fresh profile
		// does not trust.
		chromedp.Flag("ignore-certificate-errors", true))
	actx, cancel := chromedp.NewExecAllocator(ctx, opts...)
	t.Cleanup(cancel)
	bctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(cancel)
	if err := chromedp.Do(bctx); err != nil {
		t.Fatal(err)
	}
	return bctx
}

func tab(t *testing.T, browser context.Context) context.Context {
	ctx, cancel := chromedp.NewContext(browser)
	t.Cleanup(cancel)
	return ctx
}

// signIn opens the dashboard in tab and signs in with token.
func signIn(t *testing.T, tab context.Context, url, token string) {
	t.Helper()
	if err := chromedp.Do(tab,
		chromedp.Navigate(url),
		chromedp.WaitVisible(chromedp.ID("login-token")),
		chromedp.SendKeys(chromedp.ID("login-token"), token),
		chromedp.Click(chromedp.ID("login-submit")),
		chromedp.WaitVisible(chromedp.CSS(`[data-plant="plant0"]`)),
		chromedp.WaitVisible(chromedp.CSS(`[data-plant="plant1"]`)),
	); err != nil {
		t.Fatalf("sign in: %v", err)
	}
}

// count is how many elements match a selector on the page.
func count(t *testing.T, tab context.Context, sel string) int {
	t.Helper()
	n, err := chromedp.Run(tab, chromedp.Evaluate[int](`document.querySelectorAll(`+jsString(sel)+`).length`))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func jsString(s string) string {
	b := []byte{'\''}
	for _, c := range []byte(s) {
		if c == '\'' || c == '\\' {
			b = append(b, '\\')
		}
		b = append(b, c)
	}
	return string(append(b, '\''))
}

// eventually polls cond (the page updates itself; nothing reloads it).
func eventually(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func artifacts(t *testing.T) string {
	if d := os.Getenv("VMGRID_ARTIFACTS"); d != "" {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	return t.ArtifactDir()
}

func screenshot(t *testing.T, tab context.Context, name string) {
	t.Helper()
	png, err := chromedp.Run(tab, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(artifacts(t), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

// The dashboard as its users meet it: sign in, both plants, a VM created
// from the page appears and becomes RUNNING and, destroyed, goes — with
// no reload; another owner does not see it.
func testDashboard(ctx context.Context, t *testing.T, g *grid.Grid) {
	b := browser(ctx, t)
	demo := tab(t, b)
	signIn(t, demo, g.URL(), g.Token)
	before := count(t, demo, "tr.vm")
	if err := chromedp.Do(demo,
		// A marker a reload would lose.
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := chromedp.Evaluate[int](`window.notReloaded = true; 0`)(ctx, tg)
			return err
		}),
		chromedp.SendKeys(chromedp.ID("create-hostname"), "webvm"),
		chromedp.Click(chromedp.ID("create-submit")),
	); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the new VM on the page", time.Minute, func() bool { return count(t, demo, "tr.vm") > before })
	eventually(t, "the VM RUNNING", 5*time.Minute, func() bool { return count(t, demo, `tr.vm[data-state="RUNNING"]`) == before+1 })
	id, err := chromedp.Run(demo, chromedp.Evaluate[string](`document.querySelector('tr.vm[data-state="RUNNING"]').dataset.vm`))
	if err != nil {
		t.Fatal(err)
	}
	if kept, err := chromedp.Run(demo, chromedp.Evaluate[bool](`window.notReloaded === true`)); err != nil || !kept {
		t.Fatalf("the page reloaded (%v, %v)", kept, err)
	}
	// Open its actions.
	if err := chromedp.Do(demo, chromedp.Click(chromedp.CSS(`tr.vm[data-vm="`+id+`"] td`))); err != nil {
		t.Fatal(err)
	}

	bob := tab(t, b)
	signIn(t, bob, g.URL(), bobToken)
	time.Sleep(time.Second) // an overview is in
	if n := count(t, bob, `tr.vm[data-vm="`+id+`"]`); n != 0 {
		t.Fatalf("bob sees demo's VM %s", id)
	}
	screenshot(t, demo, "dashboard.png")

	if err := chromedp.Do(demo, chromedp.Click(chromedp.CSS(`button.destroy[data-vm="`+id+`"]`))); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the VM gone from the page", time.Minute, func() bool { return count(t, demo, `tr.vm[data-vm="`+id+`"]`) == 0 })
}
