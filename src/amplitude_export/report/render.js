(function () {
  const data = JSON.parse(document.getElementById('report-data').textContent);
  const datasets = {hourly: data.hourly, daily: data.daily, event_types: data.event_types,
                    platforms: data.platforms, countries: data.countries, lateness: data.lateness.buckets,
                    annotations: (data.streams && data.streams.annotations) || []};
  const specs = JSON.parse(document.getElementById('report-specs').textContent);
  const jobs = Object.entries(specs).map(([id, spec]) => {
    spec.datasets = datasets;
    return vegaEmbed('#' + id, spec, {renderer: 'svg', actions: false}).catch((error) => {
      document.getElementById(id).textContent = 'chart failed: ' + error;
      console.error(error);
      throw error;
    });
  });
  Promise.allSettled(jobs).then((results) => {
    const drawn = results.filter((r) => r.status === 'fulfilled').length;
    document.body.dataset.rendered = drawn + '/' + jobs.length;
  });
})();
