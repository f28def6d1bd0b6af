package cli

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
)

// dataFlags name the data server and the owner the data verbs act as.
type dataFlags struct {
	service
	owner string
	quiet bool
}

func (f *dataFlags) client(g *globals) (*dataclient.Client, func(), error) {
	cl, done, err := connect(g, &f.service, dataclient.NewClient)
	if err != nil {
		return nil, nil, err
	}
	cl.Owner = f.owner
	return cl, done, nil
}

func dataCmd(g *globals) *cobra.Command {
	f := &dataFlags{}
	c := group(&cobra.Command{
		Use:   "data",
		Short: "Upload, download, list and delete your files on a data server",
		Long: `Upload, download, list and delete your files on a data server.

Every file belongs to the owner of the token (--token, env VMGRID_TOKEN);
remote paths are relative, e.g. in/video.mp4. With --owner you read files
another owner shared with you (vmgrid data grant).`,
	}, dataPutCmd(g, f), dataGetCmd(g, f), dataListCmd(g, f), dataStatCmd(g, f), dataRmCmd(g, f),
		dataGrantCmd(g, f, "grant", "Let another owner read your files under PREFIX (whole path components; default: all)"),
		dataGrantCmd(g, f, "revoke", "Take back a grant"), dataGrantsCmd(g, f))
	pf := c.PersistentFlags()
	f.addrFlag(pf, "server", "VMGRID_DATASERVER", "127.0.0.1:7090", "data server")
	f.tokenFlag(pf, "no token: pass --token or set VMGRID_TOKEN")
	pf.StringVar(&f.owner, "owner", "", "read another owner's shared files (get, ls, stat)")
	return c
}

func dataPutCmd(g *globals, f *dataFlags) *cobra.Command {
	c := &cobra.Command{
		Use:   "put LOCAL REMOTE",
		Short: "Upload a file (visible only once complete and verified); LOCAL - reads stdin",
		Example: `  vmgrid data put ./video.mp4 in/video.mp4
  vmgrid data put ./video.mp4 in/          # REMOTE ending in / keeps the name
  tar c dir | vmgrid data put - in/dir.tar`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			local, remote := args[0], args[1]
			if strings.HasSuffix(remote, "/") {
				if local == "-" {
					return errors.New("REMOTE must name the file when reading stdin")
				}
				remote += filepath.Base(local)
			}
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			update, finish := progress(cmd.ErrOrStderr(), f.quiet, "uploading "+remote)
			start := time.Now()
			var info *datav1.FileInfo
			if local == "-" {
				info, err = cl.UploadReader(cmd.Context(), os.Stdin, -1, remote, update)
			} else {
				info, err = cl.Upload(cmd.Context(), local, remote, update)
			}
			finish(err)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "stored %s: %s in %s\n", info.Path, humanBytes(info.Size), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	c.Flags().BoolVarP(&f.quiet, "quiet", "q", false, "no progress bar")
	return c
}

func dataGetCmd(g *globals, f *dataFlags) *cobra.Command {
	c := &cobra.Command{
		Use:   "get REMOTE [LOCAL]",
		Short: "Download a file, resuming an interrupted download; LOCAL - writes stdout",
		Long: `Download a file to LOCAL (default: its name in the current directory; into
LOCAL when it is a directory). Data goes to LOCAL.partial first and is renamed
into place once its SHA-256 matches; running the same command again after an
interruption resumes from LOCAL.partial.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			remote := args[0]
			local := path.Base(remote)
			if len(args) == 2 {
				local = args[1]
			}
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			if local == "-" {
				_, err := cl.ReadRange(cmd.Context(), remote, 0, 0, cmd.OutOrStdout())
				return err
			}
			if st, err := os.Stat(local); err == nil && st.IsDir() {
				local = filepath.Join(local, path.Base(remote))
			}
			update, finish := progress(cmd.ErrOrStderr(), f.quiet, "downloading "+remote)
			start := time.Now()
			info, err := cl.Download(cmd.Context(), remote, local, update)
			finish(err)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "saved %s: %s in %s, sha256 verified\n", local, humanBytes(info.Size), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	c.Flags().BoolVarP(&f.quiet, "quiet", "q", false, "no progress bar")
	return c
}

func dataListCmd(g *globals, f *dataFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "ls [PREFIX]",
		Aliases: []string{"list"},
		Short:   "List files whose path starts with PREFIX",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			prefix := ""
			if len(args) == 1 {
				prefix = args[0]
			}
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			files, err := cl.List(cmd.Context(), prefix)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SIZE\tMODIFIED\tSHA256\tPATH")
			for _, fi := range files {
				mod := time.Unix(0, fi.ModifiedUnixNano).Format(time.DateTime)
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", humanBytes(fi.Size), mod, hex.EncodeToString(fi.Sha256)[:12], fi.Path)
			}
			return w.Flush()
		},
	}
}

func dataStatCmd(g *globals, f *dataFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "stat REMOTE",
		Short: "Show a file's owner, size, time and SHA-256",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			fi, err := cl.Stat(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "owner:    %s\npath:     %s\nsize:     %d (%s)\nmodified: %s\nsha256:   %s\n",
				fi.Owner, fi.Path, fi.Size, humanBytes(fi.Size), time.Unix(0, fi.ModifiedUnixNano).Format(time.RFC3339), hex.EncodeToString(fi.Sha256))
			return nil
		},
	}
}

func dataRmCmd(g *globals, f *dataFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "rm REMOTE...",
		Aliases: []string{"delete"},
		Short:   "Delete files",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			for _, p := range args {
				if err := cl.Delete(cmd.Context(), p); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "deleted", p)
			}
			return nil
		},
	}
}

// dataGrantCmd is grant and revoke: the same arguments, the opposite call.
func dataGrantCmd(g *globals, f *dataFlags, verb, short string) *cobra.Command {
	return &cobra.Command{
		Use:   verb + " OWNER [PREFIX]",
		Short: short,
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			prefix := ""
			if len(args) == 2 {
				prefix = args[1]
			}
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			if verb == "revoke" {
				if err := cl.Revoke(cmd.Context(), args[0], prefix); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "revoked %s on %q\n", args[0], prefix)
				return nil
			}
			if err := cl.Grant(cmd.Context(), args[0], prefix); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s may read %q\n", args[0], prefix)
			return nil
		},
	}
}

func dataGrantsCmd(g *globals, f *dataFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "grants",
		Short: "List the grants you gave and received",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, done, err := f.client(g)
			if err != nil {
				return err
			}
			defer done()
			given, received, err := cl.Grants(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "OWNER\tGRANTEE\tPREFIX")
			for _, gr := range append(given, received...) {
				fmt.Fprintf(w, "%s\t%s\t%q\n", gr.Owner, gr.Grantee, gr.Prefix)
			}
			return w.Flush()
		},
	}
}
